// Step charts drawn by uPlot (vendor/uplot, README there says which version and why).
// A chart keeps its points by step and redraws at most once a frame, so a stream that replays a
// long job's history costs one draw, not one per event.

/* global uPlot */
import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const HEIGHT = 200;

// lines: [{key, label}] drawn as given; `dynamic`: a RegExp whose matching keys get a line each
// as they appear (one per grader); `band`: {key, std} shades key ± std.
export class StepChart {
  constructor(title, lines, { dynamic = null, band = null } = {}) {
    this.title = title;
    this.lines = lines.map((line) => ({ ...line }));
    this.dynamic = dynamic;
    this.band = band;
    this.rows = new Map(); // step -> {key: value}
    this.plot = null;
    this.pending = false;
    this.target = h("div", { class: "plot" });
    this.empty = h("p", { class: "hint" }, "No values yet.");
    this.element = h(
      "figure",
      { class: "chart", dataset: { chart: title, points: "0" } },
      h("figcaption", {}, title),
      this.empty,
      this.target,
    );
    new ResizeObserver(() => this.plot && this.plot.setSize(this.size())).observe(this.target);
  }

  // Adds a step's values (a metrics event's data, or a row of /metrics in the same names).
  add(step, values) {
    const row = this.rows.get(step) || {};
    let changed = false;
    for (const [key, value] of Object.entries(values)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      if (this.dynamic && this.dynamic.test(key) && !this.lines.some((l) => l.key === key)) {
        this.lines.push({ key, label: key.match(this.dynamic)[1] });
        this.plot?.destroy();
        this.plot = null; // drawn anew with the new line
      }
      if (this.lines.some((l) => l.key === key) || (this.band && key === this.band.std)) {
        row[key] = value;
        changed = true;
      }
    }
    if (!changed) return;
    this.rows.set(step, row);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  size() {
    return { width: Math.max(240, this.target.clientWidth), height: HEIGHT };
  }

  draw() {
    this.pending = false;
    const steps = [...this.rows.keys()].sort((a, b) => a - b);
    const column = (get) => steps.map((step) => get(this.rows.get(step)) ?? null);
    const data = [steps, ...this.lines.map((line) => column((row) => row[line.key]))];
    if (this.band) {
      const mean = (row) => row[this.band.key];
      const std = (row) => row[this.band.std];
      const edge = (sign) => (row) =>
        mean(row) === undefined || std(row) === undefined ? null : mean(row) + sign * std(row);
      data.push(column(edge(+1)), column(edge(-1)));
    }
    if (!this.plot) this.plot = new uPlot(this.options(), data, this.target);
    else this.plot.setData(data);
    this.element.dataset.points = String(steps.length);
    this.empty.hidden = steps.length > 0;
  }

  options() {
    const series = [
      { label: "step" },
      ...this.lines.map((line, i) => ({
        label: line.label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        spanGaps: true,
        points: { show: line.sparse ? true : undefined },
      })),
    ];
    const options = { ...this.size(), series, scales: { x: { time: false } }, legend: { live: true } };
    if (this.band) {
      const at = 1 + this.lines.findIndex((l) => l.key === this.band.key);
      const hidden = { stroke: "transparent", width: 0, points: { show: false }, spanGaps: true };
      series.push({ ...hidden, label: "+std" }, { ...hidden, label: "−std" });
      options.bands = [{ series: [series.length - 2, series.length - 1], fill: "rgba(37, 99, 235, 0.15)" }];
      series[at].label = `${series[at].label} (± std)`;
    }
    return options;
  }
}
