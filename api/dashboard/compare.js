// Several jobs' curves overlaid, one line per job, from their recorded metrics.

import { call } from "./api.js";
import { StepChart } from "./charts.js";
import { errorBox, h } from "./dom.js";

// [title, kind of metrics row, our metric name]
const CURVES = [
  ["Reward (train)", "train", "reward_mean"],
  ["Reward (held-out)", "eval", "reward_mean"],
  ["Accuracy (held-out)", "eval", "accuracy"],
  ["Loss", "train", "loss"],
  ["Response length (tokens)", "train", "response_length"],
  ["Entropy", "train", "entropy"],
];

async function metricsOf(jobId) {
  const rows = [];
  let after = -1;
  for (;;) {
    const page = await call(`/v1/fine_tuning/jobs/${jobId}/metrics?after_step=${after}&limit=10000`);
    rows.push(...page.data);
    if (!page.has_more || !page.data.length) return rows;
    after = page.data[page.data.length - 1].step - 1; // the last step may have a row of each kind
  }
}

export async function compareView({ query }) {
  const chosen = (query.get("ids") || "").split(",").filter(Boolean);
  const recent = await call("/v1/fine_tuning/jobs?limit=50");
  const picker = h(
    "fieldset",
    { class: "picker" },
    h("legend", {}, "Jobs to compare"),
    recent.data.map((job) => {
      const box = h("input", { type: "checkbox", id: `pick-${job.id}`, value: job.id, checked: chosen.includes(job.id) });
      return h("span", { class: "pick" }, box, h("label", { for: box.id }, job.user_provided_suffix ? `${job.user_provided_suffix} (${job.id})` : job.id));
    }),
  );
  picker.addEventListener("change", () => {
    const ids = [...picker.querySelectorAll("input:checked")].map((box) => box.value);
    location.hash = `#/compare?ids=${ids.join(",")}`;
  });
  if (!chosen.length) {
    return h("section", {}, h("h1", {}, "Compare jobs"), h("p", {}, "Choose two or more jobs."), picker);
  }

  const jobs = await Promise.all(chosen.map((id) => call(`/v1/fine_tuning/jobs/${id}`)));
  const label = (job) => job.user_provided_suffix || job.id;
  const charts = CURVES.map(([title]) => new StepChart(title, jobs.map((job) => ({ key: job.id, label: label(job), sparse: true }))));
  const problem = h("div");
  try {
    const all = await Promise.all(jobs.map((job) => metricsOf(job.id)));
    all.forEach((rows, i) => {
      for (const row of rows) {
        CURVES.forEach(([, kind, name], c) => {
          if (row.kind === kind && name in row.values) charts[c].add(row.step, { [jobs[i].id]: row.values[name] });
        });
      }
    });
  } catch (error) {
    problem.replaceChildren(errorBox(error));
  }
  return h(
    "section",
    { class: "compare" },
    h("h1", {}, "Compare jobs"),
    picker,
    problem,
    h("div", { class: "charts" }, charts.map((c) => c.element)),
  );
}
