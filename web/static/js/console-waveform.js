// Drawing audio on one time axis: waveforms on <canvas>, a ruler of seconds, and the per-frame
// transcript (one text piece per 80 ms frame) as labels at their frame's time.
//
// Every drawing takes the same `pxPerSecond`, so x means the same time in each lane.

export const FRAME_SECONDS = 0.08; // the model runs at 12.5 frames a second
const MARKERS = new Set(["PAD", "EPAD", "BOS", "EOS"]); // per-frame entries that are not words
const DECODE_RATE = 24_000; // the model's rate; any rate draws the same picture

// The samples of a WAV, FLAC or OGG, decoded by the browser (no audio output needed: offline).
export async function decode(arrayBuffer) {
  const context = new OfflineAudioContext(1, 1, DECODE_RATE);
  return context.decodeAudioData(arrayBuffer);
}

// A canvas sized for the screen's pixels (crisp on high-DPI displays), its context scaled to CSS px.
function prepare(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

// min and max of the samples under each column: the classic waveform, true to peaks at any zoom.
function columnPeaks(samples, sampleRate, columns, pxPerSecond) {
  const peaks = new Float32Array(columns * 2);
  const perColumn = sampleRate / pxPerSecond;
  for (let x = 0; x < columns; x++) {
    const start = Math.floor(x * perColumn);
    const end = Math.min(samples.length, Math.floor((x + 1) * perColumn));
    let low = 0;
    let high = 0;
    for (let i = start; i < end; i++) {
      const value = samples[i];
      if (value < low) low = value;
      if (value > high) high = value;
    }
    peaks[2 * x] = low;
    peaks[2 * x + 1] = high;
  }
  return peaks;
}

// Channels mixed to one: what a listener hears, and what the service feeds the model.
function mono(buffer) {
  if (buffer.numberOfChannels === 1) return buffer.getChannelData(0);
  const mixed = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const channel = buffer.getChannelData(c);
    for (let i = 0; i < buffer.length; i++) mixed[i] += channel[i] / buffer.numberOfChannels;
  }
  return mixed;
}

export function drawWave(canvas, buffer, { width, height, pxPerSecond, color }) {
  const context = prepare(canvas, width, height);
  const middle = height / 2;
  context.fillStyle = "#f6f7f9";
  context.fillRect(0, 0, width, height);
  context.strokeStyle = "#d5d9e0";
  context.beginPath();
  context.moveTo(0, middle);
  context.lineTo(width, middle);
  context.stroke();
  const columns = Math.min(width, Math.ceil(buffer.duration * pxPerSecond));
  const peaks = columnPeaks(mono(buffer), buffer.sampleRate, columns, pxPerSecond);
  // Quiet audio would draw as a flat line: scale to the loudest peak, but never amplify past 8x.
  let loudest = 0;
  for (const value of peaks) loudest = Math.max(loudest, Math.abs(value));
  const gain = (middle - 2) / Math.max(loudest, 1 / 8);
  context.fillStyle = color;
  for (let x = 0; x < columns; x++) {
    const top = middle - peaks[2 * x + 1] * gain;
    const bottom = middle - peaks[2 * x] * gain;
    context.fillRect(x, top, 1, Math.max(1, bottom - top));
  }
}

// Tick spacing in seconds: the smallest of 1-2-5 steps that leaves room for a label.
function tickStep(pxPerSecond, minPixels = 70) {
  for (const step of [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]) {
    if (step * pxPerSecond >= minPixels) return step;
  }
  return 600;
}

export function drawRuler(canvas, { width, height, pxPerSecond, duration }) {
  const context = prepare(canvas, width, height);
  const step = tickStep(pxPerSecond);
  context.fillStyle = "#555";
  context.strokeStyle = "#999";
  context.font = "11px system-ui, sans-serif";
  context.textBaseline = "top";
  for (let index = 0; index * step <= duration + 1e-9; index++) {
    const t = index * step;
    const x = Math.round(t * pxPerSecond) + 0.5;
    context.beginPath();
    context.moveTo(x, height - 6);
    context.lineTo(x, height);
    context.stroke();
    const label = `${Number(t.toFixed(1))} s`;
    context.fillText(label, Math.min(x + 2, width - context.measureText(label).width - 1), 2);
  }
}

// The frames that hold words, with their time: PAD and EPAD (and BOS, EOS) are left out.
export function transcriptPieces(frames) {
  const pieces = [];
  frames.forEach((piece, index) => {
    if (!MARKERS.has(piece) && piece.trim()) pieces.push({ text: piece, at: index * FRAME_SECONDS, frame: index });
  });
  return pieces;
}

// Labels at their frame's x, in as many rows as it takes for none to overlap the one before it (up
// to maxRows: past that, zoom in; the least crowded row takes the label).
export function layTranscript(container, pieces, { pxPerSecond, rowHeight = 18, maxRows = 6 }) {
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = getComputedStyle(container).font || "12px system-ui, sans-serif";
  const rowEnds = [];
  const labels = pieces.map((piece) => {
    const left = piece.at * pxPerSecond;
    const width = measure.measureText(piece.text).width + 4;
    let row = rowEnds.findIndex((end) => end <= left);
    if (row === -1 && rowEnds.length < maxRows) row = rowEnds.push(0) - 1;
    if (row === -1) row = rowEnds.indexOf(Math.min(...rowEnds));
    rowEnds[row] = left + width;
    const label = document.createElement("span");
    label.className = "piece";
    label.textContent = piece.text;
    label.title = `frame ${piece.frame}, ${piece.at.toFixed(2)} s`;
    label.style.left = `${left}px`;
    label.style.top = `${row * rowHeight}px`;
    return label;
  });
  container.replaceChildren(...labels);
  container.style.height = `${Math.max(1, rowEnds.length) * rowHeight + 4}px`;
  return labels.length;
}
