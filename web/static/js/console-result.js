// The result view (#job/<id>): the job's state and bar while it runs; once it succeeded, the input and
// the reply as waveforms one above the other on one time axis, a player for each, the per-frame
// transcript on the same axis, and where the time went.
//
// The input is the file submitted from this tab where there is one (kept in memory), else the upload
// as the server kept it (GET /api/jobs/<id>/input, until the job's retention ends).

import { api } from "./api.js";
import { $, clock, consoleState, el, progressBar, report, say, seconds } from "./console-dom.js";
import { jobActions } from "./console-jobs.js";
import { inputOf, jobPercent, jobRecord, refresh, store } from "./console-store.js";
import { decode, drawRuler, drawWave, layTranscript, transcriptPieces } from "./console-waveform.js";

const WAVE_HEIGHT = 84;
const RULER_HEIGHT = 22;
const COLORS = { input: "#3b6fb6", reply: "#c2612c" };
// The phases in the order they happen, with what the user reads for each.
const TIMING_PARTS = [
  ["queue_wait_s", "queue wait"],
  ["load_s", "model load"],
  ["prompt_s", "prompt"],
  ["encode_s", "encode"],
  ["generate_s", "generate"],
  ["decode_s", "decode"],
];

let current = null; // {jobId, zoom, loading, outputs, urls, pxPerSecond, lastPlayed}

export function mountResult() {
  store.addEventListener("job", (event) => {
    if (current && event.detail.id === current.jobId) showState(event.detail);
  });
  for (const button of document.querySelectorAll("#view-result .zoom")) {
    button.addEventListener("click", () => {
      current.zoom = Number(button.dataset.zoom);
      if (current.outputs) layout();
      consoleState.result.pxPerSecond = current.pxPerSecond;
    });
  }
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => current?.outputs && layout(), 150);
  });
}

export async function showResult(jobId) {
  release();
  current = { jobId, zoom: 1, loading: false, outputs: null, urls: [], pxPerSecond: 0, lastPlayed: null };
  consoleState.result = { jobId, status: null, input: null, reply: null, players: 0, pieces: 0, timings: null };
  $("result-body").hidden = true;
  $("result-head").replaceChildren();
  say($("result-message"), "");
  try {
    showState(jobRecord(jobId) || (await refresh(jobId)));
  } catch (error) {
    report($("result-message"), "result", error);
  }
}

// Leaving the view: stop the players and free their audio.
export function release() {
  if (!current) return;
  for (const audio of document.querySelectorAll("#result-players audio")) audio.pause();
  current.urls.forEach((url) => URL.revokeObjectURL(url));
  current = null;
}

function showState(job) {
  renderHead(job);
  consoleState.result.status = job.status;
  if (job.status === "succeeded" && !current.loading) {
    current.loading = true;
    loadOutputs(job).catch((error) => report($("result-message"), "result", error));
  } else if (job.status === "failed") {
    say($("result-message"), `The job failed: ${job.error}`);
  } else if (job.status === "cancelled") {
    say($("result-message"), "The job was cancelled.");
  }
}

function renderHead(job) {
  const p = job.params || {};
  $("result-head").replaceChildren(
    el("h2", {}, job.input_name, el("span", { class: "muted" }, ` ${seconds(job.input_duration_s)}`)),
    el(
      "div",
      { class: "result-state" },
      el("span", { class: `badge ${job.status}` }, job.status),
      progressBar(jobPercent(job.id), barLabel(job), job.status),
      el("span", { class: "actions" }, ...jobActions(job, $("result-message"))),
    ),
    el(
      "ul",
      { class: "facts" },
      fact("job", el("code", {}, job.id)),
      fact("created", clock(job.created_at)),
      fact("started", clock(job.started_at)),
      fact("finished", clock(job.finished_at)),
      fact("worker", job.worker || "–"),
      fact("attempts", String(job.attempts)),
      fact("voice", p.voice_prompt),
      fact("seed", String(p.seed)),
      job.batch_id ? fact("batch", el("code", {}, job.batch_id)) : null,
      job.note ? fact("note", job.note) : null,
    ),
    p.text_prompt ? el("p", { class: "persona" }, el("strong", {}, "Persona: "), p.text_prompt) : null,
  );
}

function barLabel(job) {
  if (job.status === "running" && job.progress?.phase) return `${job.progress.phase} ${job.progress.done}/${job.progress.total}`;
  if (job.status === "running") return "starting";
  if (job.status === "succeeded") return "100 %";
  return job.status === "queued" ? "waiting for a worker" : "";
}

const fact = (term, value) => el("li", {}, el("span", { class: "muted" }, `${term} `), value);

// -- the outputs ----------------------------------------------------------------------------------

async function loadOutputs(job) {
  say($("result-message"), "Loading the outputs…");
  const [text, replyBlob] = await Promise.all([
    api(job.urls.text),
    api(job.urls.audio, { raw: true }).then((response) => response.blob()),
  ]);
  const file = inputOf(job.id) || (await storedInput(job));
  const reply = await decode(await replyBlob.arrayBuffer());
  let input = null;
  let inputState = file ? "undecodable" : "gone";
  if (file) {
    try {
      input = await decode(await file.arrayBuffer());
      inputState = "drawn";
    } catch {
      input = null; // the server decodes formats this browser may not: the reply still shows
    }
  }
  if (!current || current.jobId !== job.id) return; // the user moved on meanwhile
  current.outputs = { text, reply, input, inputState, pieces: transcriptPieces(text.frames) };
  $("result-body").hidden = false;
  renderPlayers(replyBlob, file);
  layout();
  renderTimings(text.timings);
  say($("result-message"), inputNote(inputState));
  Object.assign(consoleState.result, {
    duration: reply.duration,
    input: inputState,
    reply: "drawn",
    players: document.querySelectorAll("#result-players audio").length,
    pieces: current.outputs.pieces.length,
    pxPerSecond: current.pxPerSecond,
    frames: text.frames.length,
    timings: text.timings,
  });
}

// The upload as the server kept it; null once its retention ended (410), so the reply still shows.
async function storedInput(job) {
  try {
    return await api(job.urls.input, { raw: true }).then((response) => response.blob());
  } catch {
    return null;
  }
}

function inputNote(state) {
  if (state === "drawn") return "";
  if (state === "undecodable") return "This browser cannot decode the input file to draw it; the reply is shown.";
  return "The server no longer keeps this job's input (its retention ended); the reply is shown.";
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  current.urls.push(url);
  return url;
}

function renderPlayers(replyBlob, file) {
  const players = [];
  if (file) players.push(player("Input", "input", objectUrl(file)));
  players.push(player("Reply", "reply", objectUrl(replyBlob)));
  $("result-players").replaceChildren(...players);
}

function player(title, kind, url) {
  const audio = el("audio", { controls: true, preload: "metadata", src: url, class: kind, dataset: { kind } });
  audio.addEventListener("play", () => {
    current.lastPlayed = audio;
    followPlayhead();
  });
  audio.addEventListener("seeked", () => {
    current.lastPlayed = audio;
    movePlayhead();
  });
  return el("figure", { class: `player ${kind}` }, el("figcaption", {}, title), audio);
}

// -- the timeline ---------------------------------------------------------------------------------

function layout() {
  const { reply, input, pieces, inputState } = current.outputs;
  const duration = Math.max(reply.duration, input ? input.duration : 0, 0.08);
  const box = $("result-timeline");
  const width = Math.max(200, Math.round((box.clientWidth - 2) * current.zoom));
  const pxPerSecond = width / duration;
  current.pxPerSecond = pxPerSecond;
  const ruler = el("canvas", { class: "ruler" });
  const inputLane = input
    ? el("canvas", { class: "wave input" })
    : el("div", { class: "wave missing", style: `height:${WAVE_HEIGHT}px` }, inputNote(inputState));
  const replyLane = el("canvas", { class: "wave reply" });
  const transcript = el("div", { class: "transcript" });
  const playhead = el("div", { class: "playhead", id: "result-playhead" });
  const inner = el(
    "div",
    { class: "timeline-inner", style: `width:${width}px` },
    ruler,
    lane("Input", inputLane),
    lane("Reply", replyLane),
    lane("Text", transcript),
    playhead,
  );
  inner.addEventListener("click", (event) => seek((event.clientX - inner.getBoundingClientRect().left) / pxPerSecond));
  box.replaceChildren(inner);
  drawRuler(ruler, { width, height: RULER_HEIGHT, pxPerSecond, duration });
  if (input) drawWave(inputLane, input, { width, height: WAVE_HEIGHT, pxPerSecond, color: COLORS.input });
  drawWave(replyLane, reply, { width, height: WAVE_HEIGHT, pxPerSecond, color: COLORS.reply });
  layTranscript(transcript, pieces, { pxPerSecond });
  for (const button of document.querySelectorAll("#view-result .zoom")) {
    button.classList.toggle("active", Number(button.dataset.zoom) === current.zoom);
  }
  movePlayhead();
}

const lane = (title, content) => el("div", { class: "lane" }, el("span", { class: "lane-label" }, title), content);

function seek(time) {
  for (const audio of document.querySelectorAll("#result-players audio")) {
    audio.currentTime = Math.max(0, Math.min(time, audio.duration || time));
  }
  movePlayhead(time);
}

function movePlayhead(time) {
  const playhead = $("result-playhead");
  if (!playhead || !current) return;
  const at = time ?? current.lastPlayed?.currentTime ?? 0;
  playhead.style.transform = `translateX(${at * current.pxPerSecond}px)`;
  playhead.hidden = at <= 0 && !current.lastPlayed;
}

function followPlayhead() {
  const step = () => {
    movePlayhead();
    if (current?.lastPlayed && !current.lastPlayed.paused) requestAnimationFrame(step);
  };
  requestAnimationFrame(step);
}

// -- timings --------------------------------------------------------------------------------------

function renderTimings(timings) {
  const parts = TIMING_PARTS.filter(([key]) => Number(timings[key]) > 0);
  const total = parts.reduce((sum, [key]) => sum + Number(timings[key]), 0) || 1;
  const bar = el(
    "div",
    { class: "timing-bar" },
    ...parts.map(([key, label]) =>
      el("span", { class: `part ${key}`, style: `flex-grow:${Number(timings[key]) / total}`, title: `${label} ${seconds(timings[key])}` }),
    ),
  );
  const rows = TIMING_PARTS.map(([key, label]) =>
    el("tr", { dataset: { timing: key } }, el("th", {}, el("span", { class: `swatch ${key}` }), label), el("td", {}, seconds(Number(timings[key] ?? NaN))), el("td", { class: "muted" }, key === "prompt_s" && timings.prompt_cached ? "from the worker's cache" : "")),
  );
  const inference = timings.inference_s ?? timings.total_s;
  rows.push(el("tr", {}, el("th", {}, "inference"), el("td", {}, seconds(Number(inference))), el("td", { class: "muted" }, timings.rtf ? `real-time factor ${Number(timings.rtf).toFixed(2)}` : "")));
  $("result-timings").replaceChildren(bar, el("table", { class: "timings" }, el("tbody", {}, ...rows)));
}
