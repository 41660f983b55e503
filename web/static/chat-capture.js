// AudioWorklet processor for the conversation (js/conversation.js, on /chat and in the console):
// hands each block of microphone samples (mono, the context's 24 kHz) to the page, which cuts them
// into 80 ms frames of 16-bit PCM for WS /api/chat.
class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("capture", CaptureProcessor);
