// The web console at /: one page, its tabs chosen by the URL's hash so that each view has an address
// (#submit, #jobs, #job/<id>, #fleet, #talk, #voices) and the back button works.
//
//   console-dom.js       elements, wording, problems, downloads, window.consoleState
//   console-rules.js     the server's parameter rules, read from /openapi.json
//   console-store.js     the jobs and batches known, kept live by each job's events WebSocket
//   console-submit.js    Submit: one job or a batch (drop files, a folder or a zip)
//   console-jobs.js      Jobs: recent jobs and batches, cancel, downloads
//   console-result.js    a job's result: waveforms, players, transcript, timings
//   console-waveform.js  drawing audio and text on one time axis
//   console-fleet.js     Fleet: the workers, offload
//   conversation.js, voices.js (shared with /chat): the Conversation and Voices tabs
//
// The API key is entered once in the header and kept in sessionStorage by api.js: this tab only.

import { apiKey, setApiKey } from "./api.js";
import { $, consoleState, describe } from "./console-dom.js";
import { hideFleet, mountFleet, showFleet } from "./console-fleet.js";
import { hideJobs, mountJobs, showJobs } from "./console-jobs.js";
import { release, mountResult, showResult } from "./console-result.js";
import { loadRules } from "./console-rules.js";
import { forgetAll } from "./console-store.js";
import { loadCatalog, mountSubmit } from "./console-submit.js";

const HEALTH_REFRESH_MS = 10_000;

// Each tab: what to do when it is shown and when it is left. The shared modules are imported on first
// use: the console works without them, and the conversation's audio code loads only for a call.
const TABS = {
  submit: {},
  jobs: { show: showJobs, hide: hideJobs },
  result: { show: (id) => showResult(id), hide: release, tab: "jobs" },
  fleet: { show: showFleet, hide: hideFleet },
  talk: { show: () => mountOnce("talk", "./conversation.js", "mountConversation", "mount-talk") },
  voices: { show: () => mountOnce("voices", "./voices.js", "mountVoices", "mount-voices") },
};

const mounted = {};
let shown = null;

async function mountOnce(name, path, exported, rootId) {
  if (mounted[name]) return;
  mounted[name] = true;
  try {
    const module = await import(path);
    mounted[name] = module[exported]($(rootId));
  } catch (error) {
    mounted[name] = false;
    $(rootId).textContent = `This tab could not load: ${describe(error)}`;
  }
}

// "#job/<id>" -> ["result", id]; "#fleet" -> ["fleet"]; anything else -> the Submit tab.
function route() {
  const [name, argument] = location.hash.replace(/^#/, "").split("/");
  if (name === "job" && argument) return ["result", argument];
  return [TABS[name] ? name : "submit"];
}

function showRoute() {
  const [name, argument] = route();
  if (shown) TABS[shown].hide?.();
  for (const view of document.querySelectorAll("main > .view")) view.hidden = view.id !== `view-${name}`;
  const tab = TABS[name].tab || name;
  for (const link of document.querySelectorAll(".tabs [data-tab]")) {
    link.setAttribute("aria-selected", String(link.dataset.tab === tab));
  }
  shown = name;
  consoleState.tab = name;
  TABS[name].show?.(argument);
}

// -- the key --------------------------------------------------------------------------------------

function showKeyState() {
  $("key-state").textContent = apiKey() ? "Key in use (this tab only)" : "No key (kept in this tab only)";
  $("key-form").classList.remove("wanted");
  $("key-input").value = "";
  $("key-input").placeholder = apiKey() ? "•••••• (type to change)" : "if the server needs one";
}

// Another key sees other jobs and voices: forget what the old one showed and read it all again.
function keyChanged() {
  showKeyState();
  forgetAll();
  loadCatalog().catch(() => {});
  document.dispatchEvent(new CustomEvent("voices-changed")); // the shared tabs read their lists again
  showRoute();
}

function mountKey() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    keyChanged();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    keyChanged();
  });
  document.addEventListener("key-wanted", () => {
    $("key-form").classList.add("wanted");
    $("key-state").textContent = apiKey() ? "The server refused this key: enter the right one." : "The server needs an API key: enter it here.";
  });
  showKeyState();
}

// -- health ---------------------------------------------------------------------------------------

async function showHealth() {
  const badge = $("health");
  try {
    const health = await (await fetch("/health")).json();
    const parts = [health.status, `${health.workers} workers`, `${health.queue_length ?? "?"} queued`, `${health.live_slots_free} live slots free`];
    badge.textContent = parts.join(" · ");
    badge.title = health.detail || health.error || "GET /health";
    badge.dataset.status = health.status;
  } catch (error) {
    badge.textContent = "unreachable";
    badge.title = String(error);
    badge.dataset.status = "unhealthy";
  }
}

// -- start ----------------------------------------------------------------------------------------

async function start() {
  mountKey();
  await loadRules(); // before the form is filled: its defaults come from the server's document
  mountSubmit();
  mountJobs();
  mountResult();
  mountFleet();
  window.addEventListener("hashchange", showRoute);
  document.addEventListener("voices-changed", () => loadCatalog().catch(() => {}));
  showRoute();
  showHealth();
  setInterval(showHealth, HEALTH_REFRESH_MS);
  loadCatalog().catch(() => {}); // without the key yet: the catalog from the document stays
  consoleState.ready = true;
}

start();
