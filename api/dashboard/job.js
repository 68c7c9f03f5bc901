// One job: its state and controls, live curves, the rollouts of each step, its events and its
// checkpoints. Everything live comes from the job's event stream (metrics events feed the
// curves; any event refreshes the job's state), which replays the history first.

import { call, download, followJobEvents } from "./api.js";
import { StepChart } from "./charts.js";
import { age, duration, errorBox, field, h, methodType, number, select } from "./dom.js";

const ACTIVE = new Set(["validating_files", "queued", "running"]);
const REFRESH_MS = 2000; // the job's state is read again at most this often while events arrive

// The curves of a job: names are the metrics events' (train_<ours>, valid_<ours>).
export function jobCharts() {
  const sparse = (key, label) => ({ key, label, sparse: true });
  return [
    new StepChart("Reward", [{ key: "train_reward_mean", label: "train" }, sparse("valid_reward_mean", "held-out")], {
      band: { key: "train_reward_mean", std: "train_reward_std" },
      dynamic: /^train_reward\/(.+)$/,
    }),
    new StepChart("Accuracy", [{ key: "train_accuracy", label: "train" }, sparse("valid_accuracy", "held-out")]),
    new StepChart("Loss", [{ key: "train_loss", label: "loss" }]),
    new StepChart("Entropy", [{ key: "train_entropy", label: "entropy" }]),
    new StepChart("Clip fraction", [{ key: "train_clip_fraction", label: "clipped" }]),
    new StepChart("Demonstration prefix", [
      { key: "train_demo_prefix_low", label: "window low" },
      { key: "train_demo_prefix_high", label: "window high" },
      { key: "train_demo_prefix_ratio_mean", label: "prefix ratio" },
    ]),
    new StepChart("Response length (tokens)", [
      { key: "train_response_length", label: "train" },
      sparse("valid_response_length", "held-out"),
    ]),
    new StepChart("Rollout tokens/s", [{ key: "train_rollout_tokens_per_s", label: "tokens/s" }]),
  ];
}

function completionWithPrefix(sample) {
  const prefix = sample.demo_prefix_tokens > 0 ? sample.demo_prefix_text || "" : "";
  const text = sample.completion || "";
  const title = `demonstration prefix (${sample.demo_prefix_tokens} tokens)`;
  if (prefix && text.startsWith(prefix)) {
    return h("pre", {}, h("mark", { title }, prefix), text.slice(prefix.length));
  }
  return h("pre", {}, prefix ? h("mark", { title }, prefix) : null, prefix ? "\n" : null, text);
}

function sampleRow(sample) {
  const scores = Object.entries(sample.rewards || {}).map(([name, score]) => h("li", {}, `${name}: ${number(score)}`));
  const details = [
    ...Object.entries(sample.errors || {}).map(([name, text]) =>
      h("details", { open: true }, h("summary", {}, `${name} failed`), h("pre", { class: "traceback" }, text)),
    ),
    ...Object.entries(sample.outputs || {}).map(([name, text]) =>
      h("details", {}, h("summary", {}, `${name} printed`), h("pre", { class: "output" }, text)),
    ),
  ];
  const prompt = typeof sample.prompt === "string" ? sample.prompt : JSON.stringify(sample.prompt, null, 1);
  return h(
    "tr",
    {},
    h("td", {}, h("pre", {}, prompt)),
    h("td", {}, completionWithPrefix(sample)),
    h("td", { class: "num" }, number(sample.reward)),
    h("td", {}, h("ul", { class: "plain" }, scores), details),
  );
}

export async function jobView({ params: [jobId], signal }) {
  let job = await call(`/v1/fine_tuning/jobs/${jobId}`);
  const charts = jobCharts();
  const header = h("div");
  const problem = h("div", { "aria-live": "polite" });

  // ----- state and controls
  const act = (action) => async () => {
    try {
      job = await call(`/v1/fine_tuning/jobs/${jobId}/${action}`, { method: "POST" });
      showHeader();
    } catch (error) {
      problem.replaceChildren(errorBox(error));
    }
  };
  const showHeader = () => {
    const buttons = [
      h("button", { type: "button", disabled: !ACTIVE.has(job.status) && job.status !== "paused", onclick: act("cancel") }, "Cancel"),
      h("button", { type: "button", disabled: !ACTIVE.has(job.status), onclick: act("pause") }, "Pause"),
      h("button", { type: "button", disabled: job.status !== "paused", onclick: act("resume") }, "Resume"),
    ];
    if (job.status === "succeeded") {
      buttons.push(
        h(
          "button",
          {
            type: "button",
            onclick: () => download(`/v1/fine_tuning/jobs/${jobId}/adapter`, `${jobId}-adapter.tar.gz`).catch((e) => problem.replaceChildren(errorBox(e))),
          },
          "Download adapter",
        ),
        h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "Chat with it"),
      );
    }
    const finish = job.estimated_finish ? `, about ${duration(Math.max(0, job.estimated_finish - Date.now() / 1000))} to go` : "";
    header.replaceChildren(
      h("div", { class: "heading" }, h("h1", {}, job.user_provided_suffix || job.id), h("span", { class: `status ${job.status}`, "data-status": job.status }, job.status)),
      h(
        "p",
        {},
        `${methodType(job)} on ${job.model} · created ${age(job.created_at)} ago · attempt ${job.attempt}`,
        job.fine_tuned_model ? h("span", {}, " · model ", h("code", {}, job.fine_tuned_model)) : null,
      ),
      h("p", {}, h("progress", { max: job.total_steps || 1, value: job.step, "aria-label": "progress" }), ` step ${job.step} of ${job.total_steps}${finish}`),
      job.error ? errorBox(`${job.error.code}: ${job.error.message}`) : "",
      h("div", { class: "actions" }, buttons),
    );
  };

  // ----- rollouts of a step
  const stepChoice = select([["", "the latest step"]], "");
  const rollouts = h("tbody");
  const trainSteps = [];
  let shownStep = null;
  let latestTimer = null;
  let asked = 0; // the newest request wins, whatever order the answers come in
  const showRollouts = async () => {
    const step = Number(stepChoice.value) || trainSteps[trainSteps.length - 1];
    if (!step || step === shownStep) return;
    shownStep = step;
    const ask = ++asked;
    try {
      const page = await call(`/v1/fine_tuning/jobs/${jobId}/samples?step=${step}&limit=100`);
      if (ask !== asked) return;
      rollouts.replaceChildren(...page.data.map((s) => sampleRow(s.data)));
      rollouts.dataset.step = String(step);
      if (!page.data.length) rollouts.append(h("tr", {}, h("td", { colspan: 4 }, `No rollouts were kept for step ${step}.`)));
    } catch (error) {
      if (ask !== asked) return;
      shownStep = null; // asked again on the next change
      rollouts.replaceChildren(h("tr", {}, h("td", { colspan: 4 }, errorBox(error))));
    }
  };
  stepChoice.addEventListener("change", () => {
    shownStep = null;
    showRollouts();
  });

  // ----- events
  const levelChoice = select(
    [
      ["", "all levels"],
      ["info", "info"],
      ["warn", "warn"],
      ["error", "error"],
    ],
    "",
  );
  const eventList = h("ol", { class: "events", reversed: true });
  const filterEvents = () => {
    for (const item of eventList.children) item.hidden = Boolean(levelChoice.value) && item.dataset.level !== levelChoice.value;
  };
  levelChoice.addEventListener("change", filterEvents);

  // ----- checkpoints
  const checkpoints = h("tbody");
  const showCheckpoints = async () => {
    const page = await call(`/v1/fine_tuning/jobs/${jobId}/checkpoints?limit=100`);
    checkpoints.replaceChildren(
      ...page.data.map((c) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, String(c.step_number)),
          h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint)),
          h(
            "td",
            {},
            Object.entries(c.metrics)
              .filter(([name]) => /reward_mean|accuracy|loss/.test(name))
              .map(([name, value]) => `${name} ${number(value)}`)
              .join(", "),
          ),
          h("td", {}, h("a", { href: `#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "Chat")),
        ),
      ),
    );
  };

  // ----- following the stream
  // The job's state is read again after events, at most every REFRESH_MS, and once more after
  // the last of a burst, so the page never rests on a state older than its events.
  let lastRefresh = 0;
  let trailing = null;
  const refresh = () => {
    const wait = lastRefresh + REFRESH_MS - Date.now();
    if (wait > 0) {
      trailing ??= setTimeout(() => {
        trailing = null;
        refresh();
      }, wait);
      return;
    }
    lastRefresh = Date.now();
    Promise.all([call(`/v1/fine_tuning/jobs/${jobId}`), showCheckpoints()])
      .then(([fresh]) => {
        job = fresh;
        showHeader();
      })
      .catch((error) => signal.aborted || problem.replaceChildren(errorBox(error)));
  };
  signal.addEventListener("abort", () => {
    clearTimeout(trailing);
    clearTimeout(latestTimer);
  });
  const onEvent = (type, event) => {
    if (type === "metrics") {
      const data = event.data || {};
      for (const chart of charts) chart.add(data.step, data);
      if (Object.keys(data).some((k) => k.startsWith("train_")) && !trainSteps.includes(data.step)) {
        trainSteps.push(data.step);
        stepChoice.append(h("option", { value: String(data.step) }, `step ${data.step}`));
        if (!stepChoice.value) {
          clearTimeout(latestTimer); // a replayed history shows its last step once
          latestTimer = setTimeout(showRollouts, 300);
        }
      }
    } else {
      const item = h(
        "li",
        { dataset: { level: event.level } },
        h("span", { class: `level ${event.level}` }, event.level),
        " ",
        h("time", { datetime: new Date(event.created_at * 1000).toISOString() }, new Date(event.created_at * 1000).toLocaleTimeString()),
        " ",
        event.message,
      );
      eventList.prepend(item);
      filterEvents();
    }
    refresh();
  };
  followJobEvents(jobId, onEvent, signal)
    .then(() => {
      clearTimeout(trailing);
      trailing = null;
      lastRefresh = 0;
      refresh();
    })
    .catch((error) => signal.aborted || problem.replaceChildren(errorBox(error)));

  showHeader();
  await showCheckpoints();
  return h(
    "section",
    { class: "job", dataset: { job: jobId } },
    header,
    problem,
    h("h2", {}, "Curves"),
    h("div", { class: "charts" }, charts.map((c) => c.element)),
    h("h2", {}, "Rollouts"),
    field("Step", stepChoice),
    h(
      "table",
      { class: "rollouts" },
      h("thead", {}, h("tr", {}, ...["Prompt", "Completion (demonstration prefix marked)", "Reward", "Per grader"].map((t) => h("th", { scope: "col" }, t)))),
      rollouts,
    ),
    h("h2", {}, "Events"),
    field("Level", levelChoice),
    eventList,
    h("h2", {}, "Checkpoints"),
    h(
      "table",
      { class: "checkpoints" },
      h("thead", {}, h("tr", {}, ...["Step", "Model", "Metrics", ""].map((t) => h("th", { scope: "col" }, t)))),
      checkpoints,
    ),
  );
}
