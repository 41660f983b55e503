// The Fleet tab: each worker's device, GPU memory, model loaded or offloaded, running jobs, live
// sessions and idle deadline (GET /api/gpu/status, read every few seconds while the tab is shown),
// and offload per worker or for all (POST /api/gpu/offload: an admin key when keys are configured;
// a 403 is shown as the server words it).

import { api } from "./api.js";
import { $, actionButton, consoleState, el, megabytes, report, say, seconds, shortId } from "./console-dom.js";

const REFRESH_MS = 3000;

let timer = null;
let latest = null; // the last status, for the idle countdowns between reads
let ticker = null;

export function mountFleet() {
  $("fleet-offload-all").addEventListener("click", () => offload(null));
  document.addEventListener("visibilitychange", () => {
    if (timer && !document.hidden) loadFleet();
  });
}

export function showFleet() {
  loadFleet();
  timer = setInterval(() => document.hidden || loadFleet(), REFRESH_MS);
  ticker = setInterval(renderCountdowns, 1000);
}

export function hideFleet() {
  clearInterval(timer);
  clearInterval(ticker);
  timer = ticker = null;
}

export async function loadFleet() {
  try {
    latest = await api("/api/gpu/status");
  } catch (error) {
    report($("fleet-refreshed"), "fleet", error);
    return;
  }
  const workers = latest.workers;
  consoleState.fleet = {
    workers: workers.map((worker) => worker.worker),
    loaded: Object.fromEntries(workers.map((worker) => [worker.worker, Boolean(worker.model_loaded)])),
    refreshes: (consoleState.fleet?.refreshes || 0) + 1,
    at: Date.now(),
  };
  $("fleet-rows").replaceChildren(...workers.map(workerRow));
  $("fleet-empty").hidden = workers.length > 0;
  $("fleet-summary").textContent = summary(latest);
  say($("fleet-refreshed"), `Read at ${new Date().toLocaleTimeString()}, every ${REFRESH_MS / 1000} s.`);
  renderCountdowns();
}

function summary(status) {
  const loaded = status.workers.filter((worker) => worker.model_loaded).length;
  const { memory_allocated: used, memory_total: total } = status.gpu;
  const memory = total ? `, ${megabytes(used)} of ${megabytes(total)} GPU memory in use` : "";
  return `${status.worker_count} workers, ${loaded} with the model loaded, ${status.live_sessions} live conversations${memory}.`;
}

function workerRow(worker) {
  const gpu = worker.gpu || {};
  const loaded = Boolean(worker.model_loaded);
  return el(
    "tr",
    { dataset: { worker: worker.worker, loaded: String(loaded) } },
    el("td", {}, el("strong", {}, worker.worker), el("div", { class: "muted" }, `${worker.source === "live" ? "answered now" : "from its heartbeat"}`)),
    el("td", {}, worker.device || "auto", gpu.name ? el("div", { class: "muted" }, gpu.name) : null),
    el("td", {}, memoryCell(gpu)),
    el("td", {}, el("span", { class: `badge ${loaded ? "loaded" : "offloaded"}` }, loaded ? "loaded" : "offloaded")),
    el("td", {}, runningCell(worker)),
    el("td", {}, `${worker.live_sessions ?? 0} live`, el("div", { class: "muted" }, `${worker.live_slots_free ?? 0} slots free`)),
    el("td", { class: "idle", dataset: { deadline: worker.idle_deadline ?? "" } }, idleText(worker)),
    el("td", {}, actionButton("Offload", () => offload(worker.worker), { class: "worker-offload" })),
  );
}

function memoryCell(gpu) {
  if (!gpu.memory_total) return el("span", { class: "muted" }, gpu.memory_allocated ? megabytes(gpu.memory_allocated) : "no GPU memory");
  const percent = (100 * gpu.memory_reserved) / gpu.memory_total;
  return el(
    "span",
    { class: "memory" },
    el("meter", { min: 0, max: 100, value: percent, high: 90 }),
    ` ${megabytes(gpu.memory_allocated)} allocated, ${megabytes(gpu.memory_reserved)} reserved of ${megabytes(gpu.memory_total)}`,
  );
}

// Job ids are shown to admin keys only; a client key sees how many run.
function runningCell(worker) {
  const ids = worker.running_jobs;
  if (ids?.length) return ids.map((id) => el("a", { href: `#job/${id}`, class: "tag" }, shortId(id)));
  const jobs = Math.max(0, (worker.active_connections ?? 0) - (worker.live_sessions ?? 0));
  return jobs ? `${jobs} running` : el("span", { class: "muted" }, "idle");
}

function idleText(worker) {
  if (!worker.model_loaded) return el("span", { class: "muted" }, "nothing loaded");
  if (!worker.idle_deadline) return el("span", { class: "muted" }, "busy: no deadline");
  const left = worker.idle_deadline - Date.now() / 1000;
  return left > 0 ? `offloads in ${seconds(left)}` : "offloading now";
}

// Between two reads the countdowns still count.
function renderCountdowns() {
  if (!latest) return;
  for (const worker of latest.workers) {
    const cell = document.querySelector(`#fleet-rows tr[data-worker="${CSS.escape(worker.worker)}"] td.idle`);
    if (cell) cell.replaceChildren(idleText(worker));
  }
}

async function offload(name) {
  const query = name ? `?worker=${encodeURIComponent(name)}` : "";
  try {
    const answer = await api(`/api/gpu/offload${query}`, { method: "POST" });
    consoleState.offloads.push({ worker: name, ...answer });
    const each = answer.workers.map((worker) => `${worker.worker}: ${(worker.status || "no answer").replace("_", " ")}`);
    say($("fleet-message"), `Offload ${name || "all"}: ${each.join("; ") || "no worker answered"}. ${megabytes(answer.memory_allocated)} still allocated.`);
  } catch (error) {
    consoleState.offloads.push({ worker: name, error: report($("fleet-message"), "offload", error) });
  }
  await loadFleet();
}
