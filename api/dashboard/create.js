// The create-job form. Every change asks POST /v1/fine_tuning/estimates, which checks the body
// exactly as create does: its answer shows the resolved defaults and the expected duration, and
// its refusal says what is wrong before anything is created.

import { call } from "./api.js";
import { duration, errorBox, field, h, select } from "./dom.js";

const METHODS = [
  ["supervised", "supervised (SFT)"],
  ["reinforcement", "reinforcement (RFT)"],
  ["prefix_rft", "prefix_rft (demonstration prefixes + RL)"],
  ["sft_then_rft", "sft_then_rft"],
  ["psft", "psft (proximal SFT)"],
  ["psft_then_rft", "psft_then_rft"],
];
const SUPERVISED = new Set(["supervised", "psft"]);
const HYPERPARAMETERS = [
  ["n_epochs", "Epochs"],
  ["steps", "Steps (instead of epochs)"],
  ["batch_size", "Batch size (prompts per step)"],
  ["learning_rate_multiplier", "Learning rate multiplier"],
  ["compute_multiplier", "Compute multiplier (rollouts per prompt)"],
  ["eval_interval", "Evaluate every (steps)"],
  ["eval_samples", "Held-out examples per evaluation"],
];
const EXAMPLE_GRADER = {
  type: "string_check",
  name: "exact",
  input: "{{sample.output_text}}",
  reference: "{{item.answer}}",
  operation: "eq",
};

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error.message}`);
  }
}

function fileReport(file) {
  const v = file.validation || {};
  const fields = Object.entries(v.field_counts || {})
    .map(([name, count]) => `${name} (${count})`)
    .join(", ");
  return h(
    "div",
    { class: "report ok", role: "status" },
    h("strong", {}, `${file.filename} is valid`),
    h("p", {}, `${v.lines} lines, ${v.examples} examples, ${v.with_demonstration} with a demonstration.`),
    fields ? h("p", {}, `Fields: ${fields}`) : null,
  );
}

export async function createJobView() {
  const [files, models] = await Promise.all([call("/v1/files?limit=100"), call("/v1/models")]);
  const baseModels = models.data.filter((m) => !m.base_model);
  const fileOptions = () => files.data.filter((f) => f.purpose === "fine-tune").map((f) => [f.id, `${f.filename} (${f.id})`]);

  const upload = h("input", { type: "file", accept: ".jsonl,.json,application/jsonl" });
  const uploadReport = h("div", { "aria-live": "polite" });
  const trainingFile = select([["", "choose a file"], ...fileOptions()], "");
  const validationFile = select([["", "a held-out split of the training file"], ...fileOptions()], "");
  const model = select(
    baseModels.map((m) => [m.id, m.id]),
    baseModels[0]?.id,
  );
  const modelFacts = h("small", { class: "hint" });
  const method = select(METHODS, "prefix_rft");
  const adapter = select(
    [
      ["", "the default"],
      ["prefix", "prefix (prompt-start replacement)"],
      ["lora", "LoRA"],
    ],
    "",
  );
  const grader = h("textarea", { rows: 8, spellcheck: false }, JSON.stringify(EXAMPLE_GRADER, null, 2));
  const graderReport = h("div", { "aria-live": "polite" });
  const sample = h("textarea", { rows: 2 }, "42");
  const item = h("textarea", { rows: 2, spellcheck: false }, '{"answer": "42"}');
  const tryReport = h("div", { "aria-live": "polite" });
  const hyper = Object.fromEntries(
    HYPERPARAMETERS.map(([name]) => [name, h("input", { type: "number", step: "any", min: 0, placeholder: "auto" })]),
  );
  const resolved = Object.fromEntries(HYPERPARAMETERS.map(([name]) => [name, h("output", {}, "")]));
  const extra = h("textarea", { rows: 3, spellcheck: false, placeholder: '{"rollouts_per_prompt": 8, "early_stop_patience": 3}' });
  const suffix = h("input", { type: "text", maxlength: 40, pattern: "[a-z0-9]([a-z0-9]|-)*" });
  const estimate = h("div", { class: "estimate", "aria-live": "polite" }, "Choose a training file.");
  const problem = h("div", { "aria-live": "polite" });
  const graderSection = h("fieldset", {});

  const showModelFacts = () => {
    const m = baseModels.find((x) => x.id === model.value);
    modelFacts.textContent = m
      ? `${m.architecture ?? "?"}, ${m.parameters ? (m.parameters / 1e6).toFixed(1) + "M parameters" : "?"}, context ${m.context_length ?? "?"} tokens`
      : "";
  };

  const body = () => {
    const type = method.value;
    const hyperparameters = {};
    for (const [name, input] of Object.entries(hyper)) if (input.value !== "") hyperparameters[name] = Number(input.value);
    if (extra.value.trim()) Object.assign(hyperparameters, parseJson(extra.value, "More hyperparameters"));
    const settings = { hyperparameters };
    if (!SUPERVISED.has(type)) settings.grader = parseJson(grader.value, "The grader");
    if (adapter.value) settings.adapter = { type: adapter.value };
    const request = { model: model.value, training_file: trainingFile.value, method: { type, [type]: settings } };
    if (validationFile.value) request.validation_file = validationFile.value;
    if (suffix.value) request.suffix = suffix.value;
    return request;
  };

  let asked = 0;
  const updateEstimate = async () => {
    graderSection.hidden = SUPERVISED.has(method.value);
    if (!trainingFile.value) return;
    const ask = ++asked;
    try {
      const answer = await call("/v1/fine_tuning/estimates", { method: "POST", body: body() });
      if (ask !== asked) return; // a later change asked again
      const settings = answer.method[answer.method.type] || {};
      const resolvedValues = { ...(settings.hyperparameters || {}) };
      for (const [name, out] of Object.entries(resolved)) {
        out.textContent = resolvedValues[name] === undefined ? "" : `resolved: ${resolvedValues[name]}`;
      }
      estimate.replaceChildren(
        h(
          "p",
          {},
          answer.estimated_seconds === null
            ? "Duration: not measured yet on this deployment for this model and adapter."
            : `Estimated duration: ${duration(answer.estimated_seconds)}`,
        ),
        h(
          "p",
          {},
          `${answer.steps} steps (${answer.supervised_steps} supervised, ${answer.reinforcement_steps} reinforcement), ${answer.evaluations} evaluations.`,
        ),
      );
      problem.replaceChildren();
    } catch (error) {
      if (ask === asked) problem.replaceChildren(errorBox(error));
    }
  };
  let timer = null;
  const soon = () => {
    clearTimeout(timer);
    timer = setTimeout(updateEstimate, 300);
  };

  upload.addEventListener("change", async () => {
    const chosen = upload.files[0];
    if (!chosen) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", chosen);
    uploadReport.replaceChildren(h("p", {}, `Uploading ${chosen.name}…`));
    try {
      const file = await call("/v1/files", { method: "POST", form });
      files.data.unshift(file);
      for (const control of [trainingFile, validationFile]) control.append(h("option", { value: file.id }, `${file.filename} (${file.id})`));
      trainingFile.value = file.id;
      uploadReport.replaceChildren(fileReport(file));
      soon();
    } catch (error) {
      uploadReport.replaceChildren(h("div", { class: "report bad" }, h("strong", {}, `${chosen.name} was refused`), errorBox(error)));
    }
  });

  const graderCall = async (path, extraBody, report, render) => {
    try {
      const answer = await call(path, { method: "POST", body: { grader: parseJson(grader.value, "The grader"), ...extraBody() } });
      report.replaceChildren(render(answer));
    } catch (error) {
      report.replaceChildren(errorBox(error));
    }
  };
  const validate = h("button", { type: "button" }, "Check grader");
  validate.addEventListener("click", () =>
    graderCall("/v1/fine_tuning/alpha/graders/validate", () => ({}), graderReport, () => h("p", { class: "ok", role: "status" }, "The grader is valid.")),
  );
  const tryIt = h("button", { type: "button" }, "Run grader on the sample");
  tryIt.addEventListener("click", () =>
    graderCall(
      "/v1/fine_tuning/alpha/graders/run",
      () => ({ model_sample: sample.value, item: parseJson(item.value || "{}", "The item") }),
      tryReport,
      (answer) => {
        const meta = answer.metadata;
        const failed = Object.entries(meta.errors).filter(([k, v]) => v === true).map(([k]) => k);
        return h(
          "div",
          { class: "report", role: "status" },
          h("p", {}, h("strong", {}, `reward: ${answer.reward}`), failed.length ? ` (errors: ${failed.join(", ")})` : ""),
          Object.keys(answer.sub_rewards).length ? h("p", {}, `per grader: ${JSON.stringify(answer.sub_rewards)}`) : null,
          ...Object.entries(meta.messages || {}).map(([name, text]) => h("pre", { class: "traceback" }, `${name}: ${text}`)),
          ...Object.entries(meta.output || {}).map(([name, text]) => h("pre", { class: "output" }, `${name} printed: ${text}`)),
        );
      },
    ),
  );

  const create = h("button", { type: "submit" }, "Create job");
  const form = h(
    "form",
    {
      class: "create",
      onsubmit: async (event) => {
        event.preventDefault();
        create.disabled = true;
        try {
          const job = await call("/v1/fine_tuning/jobs", { method: "POST", body: body() });
          location.hash = `#/jobs/${job.id}`;
        } catch (error) {
          problem.replaceChildren(errorBox(error));
        } finally {
          create.disabled = false;
        }
      },
      oninput: soon,
      onchange: soon,
    },
    h("h1", {}, "New fine-tuning job"),
    h(
      "fieldset",
      {},
      h("legend", {}, "Data"),
      field("Upload a training file (JSONL)", upload, "Each line is checked as it uploads; a bad line is reported with its number."),
      uploadReport,
      field("Training file", trainingFile),
      field("Validation file", validationFile),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Model and method"),
      field("Base model", model),
      modelFacts,
      field("Method", method),
      field("Adapter", adapter),
    ),
    graderSection,
    h(
      "fieldset",
      {},
      h("legend", {}, "Hyperparameters"),
      h("p", { class: "hint" }, "Empty means auto; the value it resolves to is shown beside each."),
      h(
        "div",
        { class: "grid" },
        HYPERPARAMETERS.map(([name, label]) => h("div", {}, field(label, hyper[name]), resolved[name])),
      ),
      field("More hyperparameters (JSON)", extra, "Any training setting: rollouts_per_prompt, max_completion_tokens, early_stop_patience, …"),
      field("Suffix of the model name", suffix),
    ),
    estimate,
    problem,
    create,
  );
  graderSection.append(
    h("legend", {}, "Grader"),
    field("Grader (JSON)", grader, "OpenAI's grader objects (string_check, python, score_model, multi, …) or ours."),
    validate,
    graderReport,
    h(
      "div",
      { class: "try" },
      field("Try it: a model's answer", sample),
      field("Try it: the dataset line (JSON)", item),
      tryIt,
      tryReport,
    ),
  );
  model.addEventListener("change", showModelFacts);
  showModelFacts();
  graderSection.hidden = SUPERVISED.has(method.value);
  return form;
}
