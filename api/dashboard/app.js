// The dashboard: a page per hash route, each built by a view function from the API's answers.
// A view gets an AbortSignal that fires when the user leaves it, which stops its streams and
// timers.

import { apiKey, call, whenUnauthorized } from "./api.js";
import { compareView } from "./compare.js";
import { createJobView } from "./create.js";
import { errorBox, field, h } from "./dom.js";
import { jobView } from "./job.js";
import { jobListView } from "./jobs.js";
import { playgroundView } from "./playground.js";

const ROUTES = [
  [/^jobs$/, jobListView, "Jobs"],
  [/^jobs\/new$/, createJobView, "New job"],
  [/^jobs\/(ftjob-[A-Za-z0-9_-]+)$/, jobView, "Job"],
  [/^compare$/, compareView, "Compare"],
  [/^playground$/, playgroundView, "Playground"],
];

const main = document.getElementById("view");
const nav = document.getElementById("nav");
let leaving = new AbortController();
let showingSignIn = false;

function signInView() {
  const input = h("input", { type: "password", name: "api-key", autocomplete: "off", required: true });
  const problem = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    {
      class: "card narrow",
      onsubmit: async (event) => {
        event.preventDefault();
        apiKey.set(input.value.trim());
        try {
          await call("/v1/models"); // any call that needs the key tells whether it is good
          location.hash = "#/jobs";
          render();
        } catch (error) {
          apiKey.clear();
          problem.replaceChildren(errorBox(error.status === 401 ? "That API key was not accepted." : error));
        }
      },
    },
    h("h1", {}, "Sign in"),
    h("p", {}, "Your API key stays in this browser tab only (session storage), and is sent only to this service."),
    field("API key", input),
    h("button", { type: "submit" }, "Sign in"),
    problem,
  );
  return form;
}

async function render() {
  leaving.abort();
  leaving = new AbortController();
  const signedIn = Boolean(apiKey.get());
  nav.hidden = !signedIn;
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  let view = signInView;
  let title = "Sign in";
  let params = [];
  if (signedIn) {
    const route = ROUTES.find(([pattern]) => pattern.test(path)) || ROUTES[0];
    [, view, title] = route;
    params = path.match(route[0])?.slice(1) || [];
  }
  showingSignIn = view === signInView;
  document.title = `${title} · Prefix-RFT`;
  for (const link of nav.querySelectorAll("a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${path}`);
  }
  const signal = leaving.signal;
  try {
    const content = await view({ params, query: new URLSearchParams(query || ""), signal });
    if (!signal.aborted) main.replaceChildren(content);
  } catch (error) {
    if (!signal.aborted) main.replaceChildren(errorBox(error));
  }
}

whenUnauthorized(() => {
  if (showingSignIn) return; // the sign-in form says so itself
  apiKey.clear();
  render();
});
document.getElementById("sign-out").addEventListener("click", () => {
  apiKey.clear();
  location.hash = "";
  render();
});
window.addEventListener("hashchange", render);
render();
