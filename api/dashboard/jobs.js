// The job list: status, method, base model, progress, last reward and age, with filters, and
// a choice of jobs to compare. It refreshes itself every few seconds while shown.

import { call } from "./api.js";
import { age, errorBox, field, h, methodType, number, select } from "./dom.js";

const REFRESH_MS = 5000;
const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];

const SHOWN = 100; // the newest jobs; older ones are a search away through the API

async function newestJobs() {
  return call(`/v1/fine_tuning/jobs?limit=${SHOWN}`);
}

export async function jobListView({ signal }) {
  const filters = {
    status: select([["", "any status"], ...STATUSES.map((s) => [s, s])], ""),
    method: select([["", "any method"]], ""),
    model: select([["", "any model"]], ""),
    text: h("input", { type: "search", placeholder: "id, suffix or model name" }),
  };
  const body = h("tbody");
  const problem = h("div", { "aria-live": "polite" });
  const chosen = new Set();
  const compare = h("button", { type: "button", disabled: true }, "Compare selected");
  compare.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...chosen].join(",")}`;
  });
  let jobs = [];
  const more = h("p", { class: "hint", hidden: true }, `Showing the newest ${SHOWN} jobs.`);

  const addOptions = (control, values) => {
    const have = new Set([...control.options].map((o) => o.value));
    for (const value of values) if (!have.has(value)) control.append(h("option", { value }, value));
  };

  const show = () => {
    const text = filters.text.value.trim().toLowerCase();
    const visible = jobs.filter(
      (job) =>
        (!filters.status.value || job.status === filters.status.value) &&
        (!filters.method.value || methodType(job) === filters.method.value) &&
        (!filters.model.value || job.model === filters.model.value) &&
        (!text || [job.id, job.user_provided_suffix, job.fine_tuned_model].some((v) => v?.toLowerCase().includes(text))),
    );
    body.replaceChildren(
      ...visible.map((job) => {
        const box = h("input", {
          type: "checkbox",
          checked: chosen.has(job.id),
          "aria-label": `compare ${job.id}`,
          onchange: (event) => {
            event.target.checked ? chosen.add(job.id) : chosen.delete(job.id);
            compare.disabled = chosen.size < 2;
          },
        });
        return h(
          "tr",
          { dataset: { job: job.id } },
          h("td", {}, box),
          h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.user_provided_suffix || job.id), h("br"), h("small", {}, job.id)),
          h("td", {}, h("span", { class: `status ${job.status}` }, job.status)),
          h("td", {}, methodType(job)),
          h("td", {}, job.model),
          h(
            "td",
            {},
            h("progress", { max: job.total_steps || 1, value: job.step, "aria-label": `progress of ${job.id}` }),
            ` ${job.step}/${job.total_steps}`,
          ),
          h("td", { class: "num" }, number(job.last_reward)),
          h("td", {}, age(job.created_at)),
        );
      }),
    );
    if (!visible.length) body.append(h("tr", {}, h("td", { colspan: 8 }, jobs.length ? "No job matches." : "No jobs yet.")));
  };

  const refresh = async () => {
    try {
      const page = await newestJobs();
      jobs = page.data;
      more.hidden = !page.has_more;
      addOptions(filters.method, jobs.map(methodType));
      addOptions(filters.model, jobs.map((j) => j.model));
      problem.replaceChildren();
      show();
    } catch (error) {
      problem.replaceChildren(errorBox(error));
    }
  };
  await refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
  for (const control of Object.values(filters)) control.addEventListener("input", show);

  return h(
    "section",
    {},
    h("div", { class: "heading" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/jobs/new" }, "New job")),
    h(
      "div",
      { class: "filters" },
      field("Status", filters.status),
      field("Method", filters.method),
      field("Base model", filters.model),
      field("Search", filters.text),
      compare,
    ),
    problem,
    h(
      "table",
      { class: "jobs" },
      h(
        "thead",
        {},
        h("tr", {}, ...["Compare", "Job", "Status", "Method", "Base model", "Progress", "Last reward", "Age"].map((t) => h("th", { scope: "col" }, t))),
      ),
      body,
    ),
    more,
  );
}
