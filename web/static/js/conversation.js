// The live conversation: a voice and a persona, then WS /api/chat with the microphone in and the
// agent's voice and words out. Mounted by /chat and by the console; the host page owns the API key.
//
//   mountConversation(root) -> { refresh }
//
// Element ids (unique per document): voice, persona, prompt, call, hangup, status, transcript.
// window.chatState is the page's own view of the current call, which tests read:
//   { handshake, audioFrames, text, closed, closeCode, clean, errors }.
// The voice list is read again whenever `document` receives a "voices-changed" event.

import { ApiError, api, socketUrl } from "./api.js";

const SAMPLE_RATE = 24000;
const FRAME = 1920; // 80 ms at 24 kHz: the model's frame, so every message is exactly one
const KIND = { handshake: 0, audio: 1, text: 2, metadata: 4, error: 5 };
// Resolved against this module rather than the page, so it loads from /chat and from / alike.
const CAPTURE_WORKLET = new URL("../chat-capture.js", import.meta.url).href;

const MARKUP = `
<label>Voice <select id="voice"></select></label>
<label>Persona <select id="persona"></select></label>
<label>Persona prompt <textarea id="prompt" rows="4"></textarea></label>
<p><button type="button" id="call">Call</button> <button type="button" id="hangup" disabled>Hang up</button></p>
<p id="status" role="status">Not connected.</p>
<div id="transcript" aria-live="polite"></div>
`;

const STYLE = `
.conversation label { display: block; margin-top: .8rem; font-weight: 600; }
.conversation select, .conversation textarea { display: block; width: 100%; box-sizing: border-box; font-weight: normal; }
.conversation #status { color: #555; }
.conversation #transcript { white-space: pre-wrap; background: #f4f4f4; padding: .6rem; min-height: 4rem; }
`;

const freshState = () => ({ handshake: false, audioFrames: 0, text: "", closed: false, closeCode: null, errors: [] });

const describe = (error) => (error instanceof ApiError ? error.describe() : String(error));

function addStyle() {
  // Once per document: the console may mount the module in a tab that is shown and hidden.
  if (document.getElementById("conversation-style")) return;
  const style = document.createElement("style");
  style.id = "conversation-style";
  style.textContent = STYLE;
  document.head.append(style);
}

export function mountConversation(root) {
  addStyle();
  root.classList.add("conversation");
  root.innerHTML = MARKUP;
  const $ = (id) => root.querySelector("#" + id);
  const status = (line) => {
    $("status").textContent = line;
  };
  window.chatState = freshState();
  let call = null;
  let promptsLoaded = false;
  let loadFailed = false;

  async function loadVoices() {
    const listing = await api("/api/voices");
    const select = $("voice");
    // Keep the user's choice across a refresh, unless that voice is gone (deleted elsewhere).
    const chosen = select.value;
    const catalog = document.createElement("optgroup");
    catalog.label = "Catalog";
    const custom = document.createElement("optgroup");
    custom.label = "Custom";
    for (const voice of listing.voices || []) {
      (voice.custom ? custom : catalog).append(new Option(`${voice.name} (${voice.id})`, voice.id));
    }
    select.replaceChildren(catalog, ...(custom.children.length ? [custom] : []));
    const ids = [...select.options].map((option) => option.value);
    select.value = ids.includes(chosen) ? chosen : listing.default;
  }

  async function loadPrompts() {
    const listing = await api("/api/prompts");
    const select = $("persona");
    select.replaceChildren(...(listing.prompts || []).map((p) => new Option(p.name || p.id, p.text)));
    // The default goes in once: a later refresh must not overwrite what the user typed.
    if (!promptsLoaded) $("prompt").value = listing.default || "";
    promptsLoaded = true;
  }

  async function refresh() {
    const failed = (what) => (error) => {
      loadFailed = true;
      status(`${what}: ${describe(error)}`);
    };
    const wasFailing = loadFailed;
    loadFailed = false;
    // Prompts are read again only if they failed before (typically a 401 until the key was entered).
    const loads = [loadVoices().catch(failed("Voices"))];
    if (!promptsLoaded) loads.push(loadPrompts().catch(failed("Personas")));
    await Promise.all(loads);
    // Clear a load error once loading works, but never a call's own status line.
    if (wasFailing && !loadFailed && !call) status("Not connected.");
  }

  class Call {
    constructor() {
      this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
      this.pending = new Float32Array(0);
      this.playAt = 0;
      const query = { codec: "pcm", voice_prompt: $("voice").value, text_prompt: $("prompt").value };
      this.socket = new WebSocket(socketUrl("/api/chat", query));
      this.socket.binaryType = "arraybuffer";
      this.socket.onmessage = (event) => this.receive(new Uint8Array(event.data));
      this.socket.onclose = (event) => this.closed(event);
    }

    receive(message) {
      const kind = message[0];
      const payload = message.subarray(1);
      if (kind === KIND.handshake) {
        window.chatState.handshake = true;
        status("Connected: speak.");
        this.startMicrophone().catch((error) => status("Microphone: " + error));
      } else if (kind === KIND.audio) {
        window.chatState.audioFrames += 1;
        this.play(payload);
      } else if (kind === KIND.text) {
        const piece = new TextDecoder().decode(payload);
        window.chatState.text += piece;
        $("transcript").textContent += piece;
      } else if (kind === KIND.metadata) {
        const info = JSON.parse(new TextDecoder().decode(payload));
        status(
          info.queue_position != null
            ? `Waiting for a free line: ${info.queue_position} ahead.`
            : `Preparing the persona on ${info.worker}…`,
        );
      } else if (kind === KIND.error) {
        const error = new TextDecoder().decode(payload);
        window.chatState.errors.push(error);
        status(error);
      }
    }

    async startMicrophone() {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
      await this.context.audioWorklet.addModule(CAPTURE_WORKLET);
      const source = this.context.createMediaStreamSource(this.stream);
      this.capture = new AudioWorkletNode(this.context, "capture");
      this.capture.port.onmessage = (event) => this.send(event.data);
      source.connect(this.capture);
    }

    send(samples) {
      // The worklet's blocks (128 samples) do not divide a frame: carry the remainder over.
      const joined = new Float32Array(this.pending.length + samples.length);
      joined.set(this.pending);
      joined.set(samples, this.pending.length);
      let start = 0;
      for (; start + FRAME <= joined.length; start += FRAME) {
        const pcm = new Int16Array(FRAME);
        for (let i = 0; i < FRAME; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(joined[start + i] * 32768)));
        const message = new Uint8Array(1 + 2 * FRAME);
        message[0] = KIND.audio;
        message.set(new Uint8Array(pcm.buffer), 1); // little-endian on every platform browsers run on
        if (this.socket.readyState === WebSocket.OPEN) this.socket.send(message);
      }
      this.pending = joined.slice(start);
    }

    play(payload) {
      const pcm = new Int16Array(payload.buffer.slice(payload.byteOffset, payload.byteOffset + payload.byteLength));
      const buffer = this.context.createBuffer(1, pcm.length, SAMPLE_RATE);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
      const node = this.context.createBufferSource();
      node.buffer = buffer;
      node.connect(this.context.destination);
      // A short lead absorbs network jitter; frames then play back to back.
      this.playAt = Math.max(this.playAt, this.context.currentTime + 0.04);
      node.start(this.playAt);
      this.playAt += buffer.duration;
    }

    hangUp() {
      this.socket.close(1000, "hung up");
    }

    closed(event) {
      window.chatState.closed = true;
      window.chatState.closeCode = event.code;
      window.chatState.clean = event.wasClean;
      if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
      this.context.close();
      if (!window.chatState.errors.length) status(`Call ended (${event.code}).`);
      $("call").disabled = false;
      $("hangup").disabled = true;
      call = null;
    }
  }

  $("persona").onchange = () => {
    $("prompt").value = $("persona").value;
  };
  $("call").onclick = () => {
    window.chatState = freshState();
    $("transcript").textContent = "";
    status("Calling…");
    call = new Call();
    $("call").disabled = true;
    $("hangup").disabled = false;
  };
  $("hangup").onclick = () => {
    if (call) call.hangUp();
  };
  document.addEventListener("voices-changed", () => refresh());
  refresh();
  return { refresh };
}
