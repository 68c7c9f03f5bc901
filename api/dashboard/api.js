// The service's HTTP API as the dashboard uses it: every call carries the API key in the
// Authorization header (never in a URL), kept in this tab's sessionStorage only.

const KEY_NAME = "prefix-rft.api-key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error;
    const message = error ? error.message : `HTTP ${status}`;
    super(error && error.param && !message.includes(error.param) ? `${error.param}: ${message}` : message);
    this.status = status;
    this.code = error ? error.code : null;
    this.param = error ? error.param : null;
  }
}

// Called when the server refuses the key: the app signs out and shows the sign-in page.
let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${apiKey.get()}`, ...extra };
}

async function checked(response) {
  if (response.status === 401) onUnauthorized();
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status says enough
  }
  throw new ApiError(response.status, body);
}

// GET/POST/DELETE a JSON resource; `form` sends multipart (a file upload) instead of JSON.
export async function call(path, { method = "GET", body, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (form) {
    init.body = form;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await checked(await fetch(path, init));
  return response.status === 204 ? null : response.json();
}

// A download that needs the key: fetched as a blob, then saved through a temporary link.
export async function download(path, filename) {
  const response = await checked(await fetch(path, { headers: headers() }));
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// The messages of a text/event-stream response, as {id, event, data} (EventSource cannot send
// an Authorization header, so the stream is read with fetch).
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
      if (line === "") {
        if (message.data.length) yield { ...message, data: message.data.join("\n") };
        message = { id: null, event: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue; // a comment: keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") message.data.push(text);
      else if (field === "event") message.event = text;
      else if (field === "id") message.id = text;
    }
  }
}

// Follows a job's event stream to its `end`, reconnecting after a drop from the last event seen
// (Last-Event-ID), so nothing is missed or repeated. Resolves when the job has ended or `signal`
// aborts.
export async function followJobEvents(jobId, onEvent, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const init = { headers: headers({ Accept: "text/event-stream" }), signal };
      if (lastId) init.headers["Last-Event-ID"] = lastId;
      const response = await checked(await fetch(`/v1/fine_tuning/jobs/${jobId}/events/stream`, init));
      for await (const message of serverSentEvents(response)) {
        if (message.event === "end") return;
        if (message.id) lastId = message.id;
        onEvent(message.event, JSON.parse(message.data));
      }
    } catch (error) {
      if (signal.aborted || (error instanceof ApiError && error.status < 500)) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000)); // dropped: reconnect
  }
}

// A streamed chat completion: calls onDelta(text) per chunk; resolves with the finish reason.
export async function streamChat(body, onDelta, signal) {
  const response = await checked(
    await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    }),
  );
  let finish = null;
  for await (const message of serverSentEvents(response)) {
    if (message.data === "[DONE]") break;
    const chunk = JSON.parse(message.data);
    if (chunk.error) throw new ApiError(500, chunk);
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  return finish;
}
