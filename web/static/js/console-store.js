// The jobs and batches the console knows, kept current by each job's events WebSocket.
//
// One socket per unfinished job (WS /api/jobs/<id>/events): it sends the job's state first, then
// its events until the final one, so nothing is polled while it is open. A socket that closes before
// the job is final (the server restarted, Redis was lost) hands over to polling GET /api/jobs/<id>.
// Views listen for "job" and "batch" events on `store` and redraw what changed.

import { api, socketUrl } from "./api.js";
import { consoleState } from "./console-dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
export const isFinal = (status) => FINAL.has(status);

// How much of a job each phase stands for on its bar: generating dominates; loading the model happens
// once per worker, decoding is one pass at the end. The last percent is the outputs being written:
// 100 means succeeded, never "decode 1/1" of a job still running.
const PHASE_SPANS = { load: [0, 5], prompt: [5, 25], generate: [25, 95], decode: [95, 99] };
const POLL_INTERVAL_MS = 3000;
const MAX_SOCKETS = 40; // a browser allows a few hundred; a page of jobs needs fewer

export const store = new EventTarget();
const jobs = new Map(); // id -> {record, percent, phases, events}
const sockets = new Map(); // id -> WebSocket
const polls = new Map(); // id -> interval
const batches = new Map(); // id -> the batch view
const batchRefreshes = new Map(); // id -> pending timeout
const inputs = new Map(); // job id -> the File submitted from this tab (the API serves no input)

export const jobRecord = (id) => jobs.get(id)?.record;
export const jobPercent = (id) => jobs.get(id)?.percent ?? 0;
export const knownJobs = () => [...jobs.values()].map((entry) => entry.record);
export const batchView = (id) => batches.get(id);
export const knownBatches = () => [...batches.keys()];

export function keepInput(jobId, file) {
  inputs.set(jobId, file);
}
export const inputOf = (jobId) => inputs.get(jobId);

// The bar's position: a running job's phase and its done/total, kept from going backwards (a
// progress message can arrive after a later one); requeued starts again from nothing.
function percentOf(entry) {
  const { status, progress } = entry.record;
  if (status === "succeeded") return 100;
  if (status === "queued") return 0;
  if (status !== "running") return entry.percent;
  const span = PHASE_SPANS[progress?.phase];
  if (!span) return entry.percent;
  const fraction = progress.total ? Math.min(progress.done / progress.total, 1) : 0;
  return Math.max(entry.percent, span[0] + (span[1] - span[0]) * fraction);
}

function publish(id) {
  const entry = jobs.get(id);
  const { record } = entry;
  consoleState.jobs[id] = {
    status: record.status,
    percent: entry.percent,
    phase: record.progress?.phase || null,
    phases: [...entry.phases],
    events: entry.events, // the types its socket delivered, in order
    live: sockets.has(id),
    name: record.input_name,
    batchId: record.batch_id,
    error: record.error,
  };
  store.dispatchEvent(new CustomEvent("job", { detail: record }));
  if (record.batch_id && isFinal(record.status)) refreshBatchSoon(record.batch_id);
}

// A record from the API (a list, a GET, a socket's "state"): it replaces what was known.
export function remember(record) {
  const entry = jobs.get(record.id) || { record, percent: 0, phases: new Set(), events: [] };
  entry.record = record;
  if (record.progress?.phase) entry.phases.add(record.progress.phase);
  entry.percent = percentOf(entry);
  jobs.set(record.id, entry);
  publish(record.id);
  if (!isFinal(record.status)) follow(record.id);
  return record;
}

// One event of the socket, applied to the record as the server would have written it.
function apply(id, event) {
  const entry = jobs.get(id);
  if (!entry) return;
  const record = { ...entry.record };
  if (event.type === "progress") {
    record.status = "running";
    record.progress = { phase: event.phase, done: event.done, total: event.total };
    entry.phases.add(event.phase);
  } else if (event.type === "started") {
    Object.assign(record, { status: "running", worker: event.worker, attempts: event.attempts, progress: {} });
  } else if (event.type === "requeued" || event.type === "queued") {
    Object.assign(record, { status: "queued", worker: null, progress: {}, note: event.note ?? record.note });
    entry.percent = 0;
  } else if (isFinal(event.type)) {
    Object.assign(record, { status: event.type, error: event.error ?? record.error });
  }
  entry.record = record;
  entry.percent = percentOf(entry);
  publish(id);
  // The final event carries no result: read the record once, for its timings and finish time.
  if (isFinal(event.type)) refresh(id).catch(() => {});
}

export async function refresh(id) {
  return remember(await api(`/api/jobs/${id}`));
}

export function follow(id) {
  if (sockets.has(id) || polls.has(id) || sockets.size >= MAX_SOCKETS) return;
  const socket = new WebSocket(socketUrl(`/api/jobs/${id}/events`));
  sockets.set(id, socket);
  socket.onopen = () => jobs.has(id) && publish(id);
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    jobs.get(id)?.events.push(event.type);
    if (event.type === "state") remember(event.job);
    else if (event.type !== "error") apply(id, event);
  };
  // Under the development server the socket closes with 1006 even after the final event (werkzeug
  // writes an HTTP response after the close frame): what matters is whether the job is final.
  socket.onclose = () => {
    sockets.delete(id);
    if (!isFinal(jobRecord(id)?.status)) poll(id);
  };
}

function poll(id) {
  const timer = setInterval(async () => {
    try {
      const record = await refresh(id);
      if (isFinal(record.status)) stopPolling(id);
    } catch (error) {
      if (error.status === 404) stopPolling(id); // expired, or the key changed to another client's
    }
  }, POLL_INTERVAL_MS);
  polls.set(id, timer);
}

function stopPolling(id) {
  clearInterval(polls.get(id));
  polls.delete(id);
}

// Forget everything: another key sees other jobs.
export function forgetAll() {
  for (const socket of sockets.values()) {
    socket.onclose = null; // closed on purpose: no fallback to polling
    socket.close();
  }
  for (const id of [...polls.keys()]) stopPolling(id);
  sockets.clear();
  jobs.clear();
  batches.clear();
  consoleState.jobs = {};
  consoleState.batches = {};
}

export async function loadBatch(id) {
  const view = await api(`/api/batches/${id}`);
  batches.set(id, view);
  consoleState.batches[id] = { total: view.total, finished: view.finished, counts: view.counts };
  store.dispatchEvent(new CustomEvent("batch", { detail: view }));
  return view;
}

// Several jobs of a batch finish close together: one read of the batch for all of them.
export function refreshBatchSoon(id) {
  if (batchRefreshes.has(id)) return;
  batchRefreshes.set(
    id,
    setTimeout(() => {
      batchRefreshes.delete(id);
      loadBatch(id).catch(() => {});
    }, 250),
  );
}
