// The Jobs tab: the recent jobs (GET /api/jobs) with their state and a live bar each, and the batches
// among them with their counts; cancel, and download of the WAV, the text and a batch's archive.

import { api } from "./api.js";
import { $, actionButton, clock, el, progressBar, report, save, say, seconds, shortId } from "./console-dom.js";
import {
  batchView,
  isFinal,
  jobPercent,
  jobRecord,
  knownBatches,
  knownJobs,
  loadBatch,
  remember,
  store,
} from "./console-store.js";

const LIST_LIMIT = 50;
const LIST_REFRESH_MS = 15_000; // other clients' jobs (an admin key sees all); ours come by socket
const BATCH_REFRESH_MS = 3_000;
const BATCHES_SHOWN = 10;

let visible = false;
let timers = [];

export function mountJobs() {
  $("jobs-status").addEventListener("change", () => loadJobs());
  $("jobs-refresh").addEventListener("click", () => loadJobs());
  store.addEventListener("job", (event) => {
    if (visible) updateRow(event.detail);
  });
  store.addEventListener("batch", (event) => {
    if (visible) updateCard(event.detail);
  });
}

export function showJobs() {
  visible = true;
  renderAll();
  loadJobs();
  timers = [setInterval(loadJobs, LIST_REFRESH_MS), setInterval(refreshOpenBatches, BATCH_REFRESH_MS)];
}

export function hideJobs() {
  visible = false;
  timers.forEach(clearInterval);
  timers = [];
}

export async function loadJobs() {
  const status = $("jobs-status").value;
  const query = new URLSearchParams({ limit: String(LIST_LIMIT), ...(status && { status }) });
  try {
    const listing = await api(`/api/jobs?${query}`);
    listing.jobs.forEach(remember);
    say($("jobs-message"), `${listing.count} jobs${status ? " " + status : ""} (the latest ${LIST_LIMIT} at most).`);
  } catch (error) {
    report($("jobs-message"), "jobs", error);
  }
  await loadBatches();
  renderAll();
}

// The batches of the jobs shown, and those submitted from this tab: there is no list of batches.
async function loadBatches() {
  const ids = new Set(knownBatches());
  for (const job of knownJobs()) if (job.batch_id) ids.add(job.batch_id);
  const missing = [...ids].filter((id) => !batchView(id));
  await Promise.all(missing.slice(0, BATCHES_SHOWN).map((id) => loadBatch(id).catch(() => {})));
}

function refreshOpenBatches() {
  for (const id of knownBatches()) {
    if (!batchView(id).finished) loadBatch(id).catch(() => {});
  }
}

// -- the jobs table -------------------------------------------------------------------------------

const matchesFilter = (job) => !$("jobs-status").value || job.status === $("jobs-status").value;

function shownJobs() {
  return knownJobs()
    .filter(matchesFilter)
    .sort((a, b) => b.created_at - a.created_at)
    .slice(0, LIST_LIMIT);
}

function renderAll() {
  const jobs = shownJobs();
  $("jobs-rows").replaceChildren(...jobs.map(jobRow));
  $("jobs-empty").hidden = jobs.length > 0;
  const batches = knownBatches()
    .map(batchView)
    .sort((a, b) => b.created_at - a.created_at)
    .slice(0, BATCHES_SHOWN);
  $("jobs-batches").replaceChildren(...batches.map(batchCard));
}

function updateRow(job) {
  const row = document.querySelector(`#jobs-rows tr[data-job="${job.id}"]`);
  if (row && !matchesFilter(job)) row.remove(); // e.g. "running" shown, and it just finished
  else if (row) row.replaceWith(jobRow(job));
  else if (matchesFilter(job)) renderAll(); // a new job: it takes its place in the order
  const batch = job.batch_id && batchView(job.batch_id);
  if (batch) updateCard(batch); // its bar follows its jobs' bars
}

function phaseLabel(job) {
  const { status, progress } = job;
  if (status === "running" && progress?.phase) return `${progress.phase} ${progress.done}/${progress.total}`;
  if (status === "running") return "starting";
  if (status === "succeeded") return "100 %";
  return status === "queued" ? "waiting" : ""; // failed, cancelled: the badge says it
}

function jobRow(job) {
  const percent = jobPercent(job.id);
  const input = el(
    "td",
    {},
    el("a", { href: `#job/${job.id}`, class: "job-open" }, job.input_name),
    el("span", { class: "muted" }, ` ${seconds(job.input_duration_s)}`),
    job.batch_id ? el("span", { class: "tag", title: `batch ${job.batch_id}` }, `batch ${shortId(job.batch_id)}`) : null,
  );
  return el(
    "tr",
    { dataset: { job: job.id, status: job.status } },
    el("td", { title: job.id }, clock(job.created_at)),
    input,
    el("td", {}, el("span", { class: `badge ${job.status}`, title: job.error || job.note || "" }, job.status)),
    el("td", {}, progressBar(percent, phaseLabel(job), job.status)),
    el("td", {}, job.worker || "–"),
    el("td", { class: "actions" }, ...jobActions(job)),
  );
}

// Cancel, and the downloads once it succeeded; what they answer is said in `message` (an element).
export function jobActions(job, message = $("jobs-message")) {
  const actions = [];
  if (!isFinal(job.status)) actions.push(actionButton("Cancel", () => cancelJob(job.id, message), { class: "job-cancel" }));
  if (job.status === "succeeded") {
    const stem = job.input_name.replace(/\.[^.]*$/, "") || "output";
    const wav = () => download(job.urls.audio, `${stem}_personaplex.wav`, message);
    const text = () => download(job.urls.text, `${stem}_personaplex.json`, message);
    actions.push(actionButton("WAV", wav, { class: "job-wav" }), actionButton("Text", text, { class: "job-text" }));
  }
  return actions;
}

async function download(path, name, message = $("jobs-message")) {
  try {
    say(message, `Saved ${await save(path, name)}.`);
  } catch (error) {
    report(message, "download", error);
  }
}

async function cancelJob(id, message) {
  try {
    const cancelled = await api(`/api/jobs/${id}`, { method: "DELETE" });
    remember(cancelled);
    say(message, cancelled.message || `Cancelled job ${shortId(id)} (${cancelled.input_name}).`);
  } catch (error) {
    report(message, "cancel", error);
  }
}

// -- batches --------------------------------------------------------------------------------------

// The batch's bar: each job counts by its own bar (finished ones in full), so it moves as they do.
function batchPercent(batch) {
  if (!batch.total) return 0;
  const parts = batch.jobs.map((entry) => {
    if (entry.status !== "running" && entry.status !== "queued") return 100;
    return jobRecord(entry.job_id) ? jobPercent(entry.job_id) : 0;
  });
  return parts.reduce((sum, part) => sum + part, 0) / batch.total;
}

function counts(batch) {
  return Object.entries(batch.counts)
    .filter(([, count]) => count > 0)
    .map(([status, count]) => el("span", { class: `badge ${status}`, dataset: { status } }, `${count} ${status}`));
}

function batchCard(batch) {
  const id = batch.batch_id;
  const actions = [];
  if (!batch.finished) actions.push(actionButton("Cancel batch", () => cancelBatch(id), { class: "batch-cancel" }));
  actions.push(
    actionButton("Download archive", () => download(batch.urls.archive, `batch-${id}.zip`), {
      class: "batch-archive",
      disabled: !batch.finished,
      title: batch.finished ? "A zip of every output" : "Ready once every job is final",
    }),
  );
  const state = batch.finished ? "finished" : "running";
  return el(
    "article",
    { class: "batch", id: `batch-${id}`, dataset: { batch: id, finished: String(batch.finished) } },
    el("header", {}, el("strong", { title: id }, `Batch ${shortId(id)}`), el("span", { class: "muted" }, ` ${batch.total} inputs, ${clock(batch.created_at)}`)),
    el("div", { class: "counts" }, ...counts(batch)),
    progressBar(batchPercent(batch), batch.finished ? "finished" : `${batch.counts.running} running, ${batch.counts.queued} queued`, state),
    el("div", { class: "actions" }, ...actions),
  );
}

function updateCard(batch) {
  const card = $(`batch-${batch.batch_id}`);
  if (card) card.replaceWith(batchCard(batch));
  else renderAll();
}

async function cancelBatch(id) {
  try {
    const view = await api(`/api/batches/${id}`, { method: "DELETE" });
    say($("jobs-message"), `Batch ${shortId(id)}: ${view.cancelled} cancelled${view.cancel_requested ? `, ${view.cancel_requested} stopping` : ""}.`);
    await loadBatch(id);
    await loadJobs();
  } catch (error) {
    report($("jobs-message"), "cancel", error);
  }
}
