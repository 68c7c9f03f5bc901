// A chat with a base model, a fine-tuned model or a checkpoint, streamed as it is generated.

import { streamChat, call } from "./api.js";
import { errorBox, field, h, select } from "./dom.js";

export async function playgroundView({ query, signal }) {
  const models = await call("/v1/models");
  const names = models.data.map((m) => m.id);
  const wanted = query.get("model");
  if (wanted && !names.includes(wanted)) names.unshift(wanted); // a checkpoint's name
  const model = select(
    names.map((n) => [n, n]),
    wanted || names.find((n) => n.startsWith("ft:")) || names[0],
  );
  const system = h("textarea", { rows: 2, placeholder: "optional" });
  const maxTokens = h("input", { type: "number", min: 1, max: 4096, value: 64 });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const message = h("textarea", { rows: 3, required: true });
  const transcript = h("ol", { class: "transcript", "aria-live": "polite" });
  const problem = h("div", { "aria-live": "polite" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  const history = [];
  let generating = null;
  stop.addEventListener("click", () => generating?.abort());
  signal.addEventListener("abort", () => generating?.abort());

  const turn = (role, text) => {
    const content = h("div", { class: "content" }, text);
    transcript.append(h("li", { class: role, dataset: { role } }, h("strong", {}, role), content));
    return content;
  };

  const form = h(
    "form",
    {
      onsubmit: async (event) => {
        event.preventDefault();
        const text = message.value.trim();
        if (!text || generating) return;
        problem.replaceChildren();
        history.push({ role: "user", content: text });
        turn("user", text);
        message.value = "";
        const reply = turn("assistant", "");
        reply.setAttribute("aria-busy", "true");
        generating = new AbortController();
        send.disabled = true;
        stop.disabled = false;
        const messages = system.value.trim() ? [{ role: "system", content: system.value.trim() }, ...history] : history;
        try {
          const finish = await streamChat(
            { model: model.value, messages, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) },
            (delta) => reply.append(delta),
            generating.signal,
          );
          history.push({ role: "assistant", content: reply.textContent });
          reply.dataset.finish = finish || "";
        } catch (error) {
          history.pop(); // the question goes unanswered; ask again
          if (!generating.signal.aborted) problem.replaceChildren(errorBox(error));
          reply.dataset.finish = "error";
        } finally {
          reply.removeAttribute("aria-busy");
          generating = null;
          send.disabled = false;
          stop.disabled = true;
        }
      },
    },
    h("h1", {}, "Playground"),
    h("div", { class: "grid" }, field("Model", model), field("Max tokens", maxTokens), field("Temperature", temperature)),
    field("System message", system),
    transcript,
    field("Message", message),
    h("div", { class: "actions" }, send, stop),
    problem,
  );
  return form;
}
