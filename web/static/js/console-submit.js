// The Submit tab: one job (POST /api/jobs) or a batch (POST /api/batches) of dropped files, a
// folder or a zip, with shared parameters and per-file voice and seed.
//
// Everything the server would refuse for its form is refused here first, in its words
// (console-rules.js); what only the server can judge (is it audio? is the queue full?) comes back
// as its message, shown as it is, with the field or file it names marked.

import { api } from "./api.js";
import { $, bytes, consoleState, el, refuse, report, say } from "./console-dom.js";
import {
  PARAMETERS,
  catalogVoices,
  checkFile,
  checkParameters,
  checkTotalSize,
  checkValue,
  defaults,
  learnUploadLimit,
} from "./console-rules.js";
import { keepInput, loadBatch, refresh, remember } from "./console-store.js";

const HIDDEN_FILE = /(^|\/)\./; // .DS_Store and friends: the server skips them in a zip, so here too
const isZip = (file) => /\.zip$/i.test(file.name) || file.type === "application/zip";
const RECORDS_READ_AFTER_A_BATCH = 40; // the rest show in the batch's counts

const batchInputs = new Map(); // the name it is sent under (a folder's relative path) -> File
let voices = []; // [{id, name}] for the selects

export function mountSubmit() {
  const form = $("submit-form");
  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") showMode();
    clearMarks();
  });
  form.addEventListener("input", clearMarks);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    (mode() === "job" ? submitJob() : submitBatch()).catch((error) => report($("submit-message"), "submit", error));
  });
  $("submit-persona").addEventListener("change", () => {
    if ($("submit-persona").value) $("submit-text_prompt").value = $("submit-persona").value;
  });
  $("submit-batch-files").addEventListener("change", (event) => {
    addFiles([...event.target.files].map((file) => ({ file, path: file.name })));
    event.target.value = ""; // choosing the same files again adds them again
  });
  $("submit-batch-folder").addEventListener("change", (event) => {
    addFiles([...event.target.files].map((file) => ({ file, path: file.webkitRelativePath || file.name })));
    event.target.value = "";
  });
  wireDropZone($("submit-drop"));
  fillDefaults();
  showMode();
}

const mode = () => $("submit-form").elements.mode.value;

function showMode() {
  const batch = mode() === "batch";
  $("submit-job-input").hidden = batch;
  $("submit-batch-input").hidden = !batch;
  $("submit-go").textContent = batch ? "Submit batch" : "Submit job";
  $("submit-params-note").hidden = !batch;
}

// The server's defaults, from its OpenAPI document: the form is complete before the key is entered.
function fillDefaults() {
  const values = defaults();
  $("submit-text_prompt").value = values.text_prompt;
  for (const name of ["seed", "temp_audio", "temp_text", "topk_audio", "topk_text"]) {
    $(`submit-${name}`).value = String(values[name]);
  }
  $("submit-greedy").checked = Boolean(values.greedy);
  setVoices(catalogVoices().map((id) => ({ id, name: id })), values.voice_prompt);
}

function setVoices(list, preferred) {
  voices = list;
  const select = $("submit-voice");
  const chosen = preferred || select.value;
  select.replaceChildren(...list.map((voice) => new Option(voiceLabel(voice), voice.id)));
  if (list.some((voice) => voice.id === chosen)) select.value = chosen;
  for (const row of document.querySelectorAll("#submit-batch-rows select")) fillRowVoices(row, row.value);
}

const voiceLabel = (voice) => (voice.name === voice.id ? voice.id : `${voice.name} (${voice.id})`);

// Names and custom voices need the key: read again when it changes and when voices change.
export async function loadCatalog() {
  const listing = await api("/api/voices");
  setVoices(listing.voices, $("submit-voice").value || listing.default);
  const prompts = await api("/api/prompts");
  $("submit-persona").replaceChildren(
    new Option("–", ""),
    ...prompts.prompts.map((prompt) => new Option(prompt.name || prompt.id, prompt.text)),
  );
}

// -- the form's values -------------------------------------------------------------------------

function sharedValues() {
  const values = {};
  for (const name of PARAMETERS) {
    const field = $(`submit-${name === "voice_prompt" ? "voice" : name}`);
    if (name === "greedy") values.greedy = field.checked ? "true" : "false";
    else if (name === "text_prompt" || field.value.trim()) values[name] = field.value;
  }
  return values;
}

function appendValues(body, values) {
  for (const [name, value] of Object.entries(values)) body.append(name, value);
}

function clearMarks() {
  for (const marked of document.querySelectorAll("#submit-form [aria-invalid]")) marked.removeAttribute("aria-invalid");
}

// Mark what a problem names: a parameter ({field}) or an input of the batch ({file}).
function mark({ field, file } = {}) {
  const input = field && $(`submit-${field === "voice_prompt" ? "voice" : field}`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    const folded = input.closest("details");
    if (folded) folded.open = true; // a sampling field at fault is shown, not left folded away
  }
  if (file) {
    for (const row of document.querySelectorAll("#submit-batch-rows tr")) {
      if (row.dataset.path === file) row.setAttribute("aria-invalid", "true");
    }
  }
}

function refuseHere(problem) {
  mark(problem);
  refuse($("submit-message"), "submit", problem.message);
}

function failed(error) {
  if (error.status === 413) learnUploadLimit(error.body);
  mark(error.body);
  report($("submit-message"), "submit", error);
}

// -- one job ------------------------------------------------------------------------------------

async function submitJob() {
  const file = $("submit-file").files[0];
  const values = sharedValues();
  const fileProblem = checkFile(file);
  if (fileProblem) return refuseHere({ message: fileProblem });
  const problem = checkParameters(values);
  if (problem) return refuseHere(problem);
  const body = new FormData();
  body.append("file", file, file.name);
  appendValues(body, values);
  say($("submit-message"), `Uploading ${file.name} (${bytes(file.size)})…`);
  let accepted;
  try {
    accepted = await api("/api/jobs", { method: "POST", body });
  } catch (error) {
    return failed(error);
  }
  keepInput(accepted.job_id, file);
  consoleState.submitted.push({ kind: "job", id: accepted.job_id });
  remember(accepted.job);
  say($("submit-message"), `Queued job ${accepted.job_id}.`);
  location.hash = `#job/${accepted.job_id}`;
}

// -- a batch ------------------------------------------------------------------------------------

function addFiles(items) {
  for (const { file, path } of items) {
    if (!HIDDEN_FILE.test(path)) batchInputs.set(path, file);
  }
  renderRows();
}

function renderRows() {
  const rows = [...batchInputs].map(([path, file]) => inputRow(path, file));
  $("submit-batch-rows").replaceChildren(...rows);
  $("submit-batch-table").hidden = rows.length === 0;
}

function inputRow(path, file) {
  const zip = isZip(file);
  const voice = el("select", { "aria-label": `Voice for ${path}`, disabled: zip });
  fillRowVoices(voice, "");
  const seed = el("input", { inputmode: "numeric", placeholder: "shared", "aria-label": `Seed for ${path}`, disabled: zip });
  const remove = el("button", { type: "button", title: "Remove", onclick: () => { batchInputs.delete(path); renderRows(); } }, "×");
  const name = zip ? [path, el("span", { class: "muted" }, " zip: its audio files become the inputs")] : [path];
  return el("tr", { dataset: { path } }, el("td", {}, ...name), el("td", {}, bytes(file.size)), el("td", {}, voice), el("td", {}, seed), el("td", {}, remove));
}

function fillRowVoices(select, chosen) {
  select.replaceChildren(new Option("shared", ""), ...voices.map((voice) => new Option(voiceLabel(voice), voice.id)));
  select.value = chosen;
}

// per_file: {sent name: {voice_prompt, seed}} for the rows that set either.
function perFileOverrides() {
  const overrides = {};
  for (const row of document.querySelectorAll("#submit-batch-rows tr")) {
    const [voice, seed] = [row.querySelector("select").value, row.querySelector("input").value.trim()];
    const own = { ...(voice && { voice_prompt: voice }), ...(seed && { seed }) };
    if (Object.keys(own).length) overrides[row.dataset.path] = own;
  }
  return overrides;
}

function checkBatch(values, overrides) {
  if (!batchInputs.size) return { message: "No audio chosen: drop files, a folder or a zip, or choose them." };
  for (const [path, file] of batchInputs) {
    const problem = checkFile(file, true);
    if (problem) return { message: problem.replace(file.name, path), file: path };
  }
  const total = checkTotalSize([...batchInputs.values()]);
  if (total) return { message: total };
  const shared = checkParameters(values);
  if (shared) return shared;
  for (const [path, own] of Object.entries(overrides)) {
    const message = own.seed !== undefined && checkValue("seed", own.seed);
    if (message) return { message: `${path}: ${message}`, file: path };
  }
  return null;
}

async function submitBatch() {
  const values = sharedValues();
  const overrides = perFileOverrides();
  const problem = checkBatch(values, overrides);
  if (problem) return refuseHere(problem);
  const body = new FormData();
  for (const [path, file] of batchInputs) body.append("files", file, path); // a zip is expanded by the server
  appendValues(body, values);
  if (Object.keys(overrides).length) body.append("per_file", JSON.stringify(overrides));
  say($("submit-message"), `Uploading ${batchInputs.size} files…`);
  let accepted;
  try {
    accepted = await api("/api/batches", { method: "POST", body });
  } catch (error) {
    return failed(error);
  }
  for (const input of accepted.inputs) {
    const file = batchInputs.get(input.filename);
    if (file && !isZip(file)) keepInput(input.job_id, file);
  }
  consoleState.submitted.push({ kind: "batch", id: accepted.batch_id });
  say($("submit-message"), `Queued batch ${accepted.batch_id}: ${accepted.count} jobs.`);
  batchInputs.clear();
  renderRows();
  await loadBatch(accepted.batch_id);
  location.hash = "#jobs";
  // The records give each row its bar and live events; a large batch shows in its counts.
  await Promise.all(accepted.inputs.slice(0, RECORDS_READ_AFTER_A_BATCH).map((input) => refresh(input.job_id).catch(() => {})));
}

// -- drag and drop -------------------------------------------------------------------------------

function wireDropZone(zone) {
  const over = (on) => (event) => {
    event.preventDefault();
    zone.classList.toggle("over", on);
  };
  // From the keyboard, the zone opens the file chooser: dropping needs a mouse.
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("submit-batch-files").click();
    }
  });
  zone.addEventListener("dragenter", over(true));
  zone.addEventListener("dragover", over(true));
  zone.addEventListener("dragleave", over(false));
  zone.addEventListener("drop", async (event) => {
    over(false)(event);
    addFiles(await droppedFiles(event.dataTransfer));
  });
}

// Files and folders alike: a dropped folder is walked, its files named by their path inside it.
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...transfer.files].map((file) => ({ file, path: file.name }));
  const found = await Promise.all(entries.map(walk));
  return found.flat();
}

async function walk(entry) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    return [{ file, path: entry.fullPath.replace(/^\//, "") }];
  }
  const reader = entry.createReader();
  const children = [];
  // readEntries answers in chunks (100 at a time in Chromium) until it answers nothing.
  for (;;) {
    const chunk = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!chunk.length) break;
    children.push(...chunk);
  }
  return (await Promise.all(children.map(walk))).flat();
}
