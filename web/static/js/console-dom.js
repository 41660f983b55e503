// What every part of the console shares: building elements, wording numbers and times, saying
// what went wrong, saving what the API serves, and `consoleState`, the page's view of itself.

import { ApiError, api } from "./api.js";

// Read by the tests (and anyone in the devtools console) where the DOM alone would be flaky.
export const consoleState = {
  ready: false,
  tab: null,
  problems: [], // every problem shown: {where, status (null: the browser's own check), text}
  jobs: {}, // job id -> {status, percent, phase, phases (seen), name, batchId, error}
  batches: {}, // batch id -> {total, finished, counts}
  submitted: [], // what this tab submitted, in order: {kind: "job" or "batch", id}
  result: null, // the result view: {jobId, duration, input, reply, players, pieces, timings}
  fleet: null, // {workers: [names], loaded: {name: bool}, refreshes, at}
  offloads: [], // every offload answer (or error)
  downloads: [], // the file names saved
};
window.consoleState = consoleState;

export const $ = (id) => document.getElementById(id);

// el("button", {class: "x", onclick: f, type: "button"}, "text", child...): attributes and
// properties in one object, so views read as their markup.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

export const describe = (error) => (error instanceof ApiError ? error.describe() : String(error.message || error));

// Show `error` in `target` (an element) as the server wrote it, and remember it in consoleState.
// A 401 also points at the key field: it is the one thing the user can do about it.
export function report(target, where, error) {
  const text = describe(error);
  const status = error instanceof ApiError ? error.status : null;
  consoleState.problems.push({ where, status, text });
  if (target) {
    target.textContent = text;
    target.classList.add("problem");
  }
  if (status === 401) document.dispatchEvent(new CustomEvent("key-wanted"));
  return text;
}

// A browser-side check that failed: worded like the server's, shown the same way.
export function refuse(target, where, text) {
  consoleState.problems.push({ where, status: null, text });
  target.textContent = text;
  target.classList.add("problem");
}

export function say(target, text) {
  target.textContent = text;
  target.classList.remove("problem");
}

export function seconds(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

export function clock(unix) {
  if (!unix) return "–";
  const when = new Date(unix * 1000);
  const today = new Date().toDateString() === when.toDateString();
  return today ? when.toLocaleTimeString() : when.toLocaleString();
}

export function bytes(count) {
  if (count < 1024) return `${count} B`;
  if (count < 1024 * 1024) return `${(count / 1024).toFixed(1)} kB`;
  return `${(count / 1024 / 1024).toFixed(1)} MB`;
}

export const megabytes = (mb) => (mb >= 1024 ? `${(mb / 1024).toFixed(1)} GB` : `${Math.round(mb || 0)} MB`);

export const shortId = (id) => id.slice(0, 8);

// <progress> speaks to screen readers and needs no styling to be understood; the label says the phase.
export function progressBar(percent, label, state) {
  return el(
    "span",
    { class: `bar ${state || ""}` },
    el("progress", { max: 100, value: percent, title: `${Math.round(percent)} %` }),
    el("span", { class: "bar-label" }, label),
  );
}

// Downloads go through fetch: a plain link cannot carry the API key's Authorization header.
export async function save(path, fallbackName) {
  const response = await api(path, { raw: true });
  const name = filenameOf(response.headers.get("Content-Disposition")) || fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  consoleState.downloads.push(name);
  return name;
}

function filenameOf(disposition) {
  if (!disposition) return null;
  const encoded = /filename\*=UTF-8''([^;]+)/i.exec(disposition);
  if (encoded) return decodeURIComponent(encoded[1]);
  const plain = /filename="?([^";]+)"?/i.exec(disposition);
  return plain ? plain[1] : null;
}

// A button whose action is async: disabled while it runs, so a double click does not act twice.
export function actionButton(text, action, attributes = {}) {
  const button = el("button", { type: "button", ...attributes }, text);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
    }
  });
  return button;
}
