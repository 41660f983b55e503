// The voices: the catalog's and the custom ones (GET /api/voices), uploading a recording as a new
// custom voice (POST /api/voices) and deleting one (DELETE /api/voices/<id>). Mounted by /chat and
// by the console; the host page owns the API key.
//
//   mountVoices(root) -> { refresh }
//
// Element ids, prefixed so that the conversation's can share the document: voices-list (one <li
// data-voice-id> a voice, custom ones with a voices-delete-<id> button), voices-form, voices-file,
// voices-name, voices-consent, voices-upload, voices-message.
// After an upload or a delete it dispatches "voices-changed" on `document` (the conversation's voice
// select listens); it also refreshes on one dispatched by anyone else, e.g. a host whose key changed.
// window.voicesState is what tests read: { ids, message, error, measured, busy }, `measured` being
// the duration in seconds the browser decoded from the last file it checked (null if it could not).

import { ApiError, api } from "./api.js";

// The server's rules (personaplex/custom_voices.py), checked here so that a mistake costs no upload.
const MAX_NAME_CHARS = 64;
const MIN_SECONDS = 1;
const MAX_SECONDS = 60;

const MARKUP = `
<ul id="voices-list" aria-label="Voices"></ul>
<form id="voices-form" novalidate>
<fieldset>
  <legend>Upload a custom voice</legend>
  <label>Recording: 1 to 60 s of the speaker alone (WAV, FLAC or OGG, any sample rate)
    <input type="file" id="voices-file" accept="audio/*,.wav,.flac,.ogg"></label>
  <label>Name <input type="text" id="voices-name" autocomplete="off" placeholder="e.g. Anna"></label>
  <label class="voices-consent"><input type="checkbox" id="voices-consent">
    I attest that the person speaking in this recording agreed to have their voice used to make the
    agent speak on this service. The server records this attestation with the time and my address.</label>
  <p><button type="submit" id="voices-upload">Upload</button></p>
</fieldset>
</form>
<p id="voices-message" role="status"></p>
`;

const STYLE = `
.voices label { display: block; margin-top: .8rem; font-weight: 600; }
.voices input[type=text], .voices input[type=file] { display: block; width: 100%; box-sizing: border-box; }
.voices label.voices-consent { font-weight: normal; }
.voices fieldset { margin-top: 1rem; border: 1px solid #ddd; }
.voices #voices-list { list-style: none; padding: 0; margin: 0; }
.voices #voices-list li { display: flex; gap: .6rem; align-items: baseline; padding: .25rem 0; border-bottom: 1px solid #eee; }
.voices #voices-list li .voices-name { font-weight: 600; }
.voices #voices-list li .voices-detail { color: #555; flex: 1; }
.voices .voices-badge { background: #2a6; color: #fff; border-radius: .6rem; padding: 0 .5rem; font-size: .8em; }
.voices #voices-message.error { color: #b00; }
`;

const describe = (error) => (error instanceof ApiError ? error.describe() : String(error));

function addStyle() {
  if (document.getElementById("voices-style")) return;
  const style = document.createElement("style");
  style.id = "voices-style";
  style.textContent = STYLE;
  document.head.append(style);
}

// The server's check_voice_name: the same wording, so a user reads one rule whichever side caught it.
export function nameProblem(raw) {
  const name = raw.trim();
  const chars = [...name].length; // code points, as Python's len() counts
  if (!chars) return "name is required: the voice's display name, e.g. 'Anna'.";
  if (chars > MAX_NAME_CHARS) return `name is too long: the limit is ${MAX_NAME_CHARS} characters, got ${chars}.`;
  if (/\p{C}/u.test(name)) return "name must not hold control or format characters.";
  // The id is made of what survives NFKD and dropping non-ASCII: 'Émile' keeps its E, '日本' nothing.
  const ascii = name.normalize("NFKD").replace(/[^\x00-\x7f]/g, "");
  if (!/[a-z0-9]/i.test(ascii)) return "name must hold at least one ASCII letter or digit (the voice's id is made from it).";
  return null;
}

// Seconds of audio in `file`, or null when this browser cannot decode it: the server decodes more
// formats than some browsers, and is the judge of anything not decodable here.
async function measure(file) {
  const context = new AudioContext();
  try {
    const decoded = await context.decodeAudioData(await file.arrayBuffer());
    return decoded.duration;
  } catch {
    return null;
  } finally {
    context.close();
  }
}

function voiceItem(voice) {
  const item = document.createElement("li");
  item.dataset.voiceId = voice.id;
  const name = document.createElement("span");
  name.className = "voices-name";
  name.textContent = voice.name;
  const id = document.createElement("code");
  id.textContent = voice.id;
  const detail = document.createElement("span");
  detail.className = "voices-detail";
  item.append(name, id);
  if (!voice.custom) {
    detail.textContent = voice.category;
    item.append(detail);
    return item;
  }
  const badge = document.createElement("span");
  badge.className = "voices-badge";
  badge.textContent = "custom";
  const created = new Date(voice.created_at * 1000);
  const when = document.createElement("time");
  when.dateTime = created.toISOString();
  when.textContent = created.toLocaleString();
  detail.append(`${voice.duration_s.toFixed(1)} s, added `, when);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.id = "voices-delete-" + voice.id; // custom ids are [a-z0-9-]: safe in an id and a selector
  remove.className = "voices-delete";
  remove.textContent = "Delete";
  remove.dataset.voiceId = voice.id;
  remove.dataset.voiceName = voice.name;
  item.append(badge, detail, remove);
  return item;
}

export function mountVoices(root) {
  addStyle();
  root.classList.add("voices");
  root.innerHTML = MARKUP;
  const $ = (id) => root.querySelector("#" + id);
  const state = { ids: [], message: "", error: false, measured: null, busy: false };
  window.voicesState = state;
  let announcing = false;
  let listFailed = false; // its message goes once the list loads (say, after the key was entered)

  const say = (message, error = false) => {
    state.message = message;
    state.error = error;
    $("voices-message").textContent = message;
    $("voices-message").classList.toggle("error", error);
  };

  const busy = (on) => {
    state.busy = on;
    $("voices-upload").disabled = on;
    for (const button of root.querySelectorAll(".voices-delete")) button.disabled = on;
  };

  async function refresh() {
    try {
      const listing = await api("/api/voices");
      const voices = listing.voices || [];
      $("voices-list").replaceChildren(...voices.map(voiceItem));
      state.ids = voices.map((voice) => voice.id);
      if (listFailed) say("");
      listFailed = false;
    } catch (error) {
      listFailed = true;
      say("Voices: " + describe(error), true);
    }
  }

  // Refresh here first, then tell the others: whoever reads the event finds this list current.
  async function changed() {
    await refresh();
    announcing = true;
    try {
      document.dispatchEvent(new CustomEvent("voices-changed"));
    } finally {
      announcing = false;
    }
  }

  async function upload() {
    const file = $("voices-file").files[0];
    const name = $("voices-name").value;
    state.measured = null;
    if (!file) return say("Choose a recording to upload: 1 to 60 s of the speaker alone.", true);
    const problem = nameProblem(name);
    if (problem) return say(problem, true);
    if (!$("voices-consent").checked) {
      return say("Tick the consent box: uploading attests that the speaker agreed to this use of their voice.", true);
    }
    busy(true);
    try {
      say("Checking the recording…");
      const seconds = (state.measured = await measure(file));
      if (seconds !== null && seconds < MIN_SECONDS) {
        return say(`The voice recording is too short: ${seconds.toFixed(2)} s; it needs ${MIN_SECONDS} s or more.`, true);
      }
      if (seconds !== null && seconds > MAX_SECONDS) {
        return say(`The voice recording is too long: ${seconds.toFixed(2)} s; the limit is ${MAX_SECONDS} s.`, true);
      }
      say("Uploading…");
      const body = new FormData();
      body.append("file", file);
      body.append("name", name.trim());
      body.append("consent", "true");
      const voice = await api("/api/voices", { method: "POST", body });
      $("voices-form").reset();
      say(`Added the voice ${voice.name} as ${voice.id} (${voice.duration_s.toFixed(1)} s).`);
      await changed();
    } catch (error) {
      say(describe(error), true);
    } finally {
      busy(false);
    }
  }

  async function remove(button) {
    const { voiceId, voiceName } = button.dataset;
    if (!window.confirm(`Delete the voice ${voiceName} (${voiceId})? Calls and jobs can no longer use it.`)) return;
    busy(true);
    try {
      await api("/api/voices/" + encodeURIComponent(voiceId), { method: "DELETE" });
      say(`Deleted the voice ${voiceName} (${voiceId}).`);
      await changed();
    } catch (error) {
      say(describe(error), true);
    } finally {
      busy(false);
    }
  }

  $("voices-form").addEventListener("submit", (event) => {
    event.preventDefault();
    upload();
  });
  $("voices-list").addEventListener("click", (event) => {
    const button = event.target.closest(".voices-delete");
    if (button) remove(button);
  });
  document.addEventListener("voices-changed", () => {
    if (!announcing) refresh();
  });
  refresh();
  return { refresh };
}
