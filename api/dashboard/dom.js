// Building the page from data: every text goes in as a text node, never as HTML, because
// prompts, completions, grader output and file names are the users' (and models') words.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

// A labelled form control: the label names it for screen readers and tests alike.
let nextId = 0;
export function field(label, control, hint) {
  control.id ||= `field-${++nextId}`;
  const hintElement = hint ? h("small", { id: `${control.id}-hint`, class: "hint" }, hint) : null;
  if (hintElement) control.setAttribute("aria-describedby", hintElement.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintElement);
}

export function select(options, value) {
  return h(
    "select",
    {},
    options.map(([optionValue, text]) => h("option", { value: optionValue, selected: optionValue === value }, text)),
  );
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof Error ? error.message : String(error));
}

export function age(seconds) {
  const elapsed = Math.max(0, Date.now() / 1000 - seconds);
  if (elapsed < 60) return `${Math.round(elapsed)} s`;
  if (elapsed < 3600) return `${Math.round(elapsed / 60)} min`;
  if (elapsed < 86400) return `${(elapsed / 3600).toFixed(1)} h`;
  return `${Math.round(elapsed / 86400)} d`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function number(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

export function methodType(job) {
  return job.method ? job.method.type : "supervised";
}
