// The server's rules for a job's parameters, checked in the browser before anything is uploaded.
//
// The rules are read from the server's own OpenAPI document (components.schemas.JobUpload, written
// by pydantic from web/schemas.py.GenerationForm), so the page checks what this server checks, with
// its defaults; FALLBACK holds the same values for a server whose document cannot be read. The
// messages copy web/schemas.py's `describe` ("seed must be an integer, got 'many'."): a user reads
// one wording whichever side caught the mistake. The server stays the judge: whatever it still
// refuses is shown as it words it.

const FALLBACK = {
  voice_prompt: { type: "string", default: "NATF2.pt" },
  text_prompt: { type: "string", maxLength: 8000, default: "" },
  seed: { type: "integer", minimum: -1, exclusiveMaximum: 2 ** 63, default: 42424242 },
  greedy: { type: "boolean", default: false },
  temp_audio: { type: "number", minimum: 0, maximum: 10, default: 0.8 },
  temp_text: { type: "number", minimum: 0, maximum: 10, default: 0.7 },
  topk_audio: { type: "integer", minimum: 1, default: 250 },
  topk_text: { type: "integer", minimum: 1, default: 25 },
};

export const PARAMETERS = Object.keys(FALLBACK);

// What pydantic's lax mode takes for an int or a float from a form field (already stripped):
// "+7", "1_000", "5.00" are integers; "1e3" and "5." are not; "inf" and "nan" are numbers, but not
// finite ones.
const INTEGER = /^[+-]?\d+(_\d+)*(\.0+)?$/;
const FLOAT = /^[+-]?(\d+(_\d+)*_?(\.(\d+(_\d+)*)?)?|\.\d+(_\d+)*)([eE][+-]?\d+)?$/;
const NOT_FINITE = /^[+-]?(inf|infinity|nan)$/i;

let rules = FALLBACK;
let limits = { uploadBytes: null }; // learnt from a 413's limit_bytes: the API does not publish it

// Read the rules once from /openapi.json (open to all: no key needed); keep the fallback if it fails.
export async function loadRules() {
  try {
    const response = await fetch("/openapi.json");
    const document = await response.json();
    const properties = document.components.schemas.JobUpload.properties;
    rules = Object.fromEntries(PARAMETERS.map((name) => [name, { ...FALLBACK[name], ...properties[name] }]));
  } catch {
    rules = FALLBACK;
  }
  return rules;
}

export const defaults = () => Object.fromEntries(PARAMETERS.map((name) => [name, rules[name].default]));

// The catalog's voice ids as the document lists them: the voice select is usable before the key is.
export function catalogVoices() {
  const schema = rules.voice_prompt;
  const listed = (schema.anyOf || []).find((option) => option.enum);
  return listed ? listed.enum : [schema.default];
}

export function learnUploadLimit(errorBody) {
  if (errorBody && Number.isFinite(errorBody.limit_bytes)) limits.uploadBytes = errorBody.limit_bytes;
}

// Python's repr of a short string, as the server quotes what it got.
function quoted(raw) {
  const shown = raw.slice(0, 64);
  return shown.includes("'") && !shown.includes('"') ? `"${shown}"` : `'${shown}'`;
}

// Bounds written as Python writes them: a float field's 10 is "10.0".
const bound = (value, type) => (type === "number" && Number.isInteger(value) ? value.toFixed(1) : String(value));

// The problem with one raw form value, or null; blank means "the default" (the server's rule too),
// except text_prompt, where blank means no persona.
export function checkValue(name, raw) {
  const rule = rules[name];
  if (!rule || name === "voice_prompt" || name === "greedy") return null;
  if (name === "text_prompt") {
    const length = [...raw].length; // code points, as Python's len() counts
    return length > rule.maxLength ? `text_prompt is too long: the limit is ${rule.maxLength} characters, got ${length}.` : null;
  }
  const text = raw.trim();
  if (!text) return null;
  if (rule.type === "integer") return checkInteger(name, text, rule);
  return checkNumber(name, text, rule);
}

function checkInteger(name, text, rule) {
  if (!INTEGER.test(text)) return `${name} must be an integer, got ${quoted(text)}.`;
  // BigInt: a seed runs up to 2**63, past the doubles' exact integers.
  const value = BigInt(text.replace(/_/g, "").replace(/\.0+$/, ""));
  if (rule.minimum !== undefined && value < BigInt(rule.minimum)) {
    return `${name} must be at least ${rule.minimum}, got ${quoted(text)}.`;
  }
  if (rule.exclusiveMaximum !== undefined && value >= BigInt(rule.exclusiveMaximum)) {
    return `${name} must be less than ${BigInt(rule.exclusiveMaximum)}, got ${quoted(text)}.`;
  }
  if (rule.maximum !== undefined && value > BigInt(rule.maximum)) {
    return `${name} must be at most ${rule.maximum}, got ${quoted(text)}.`;
  }
  return null;
}

function checkNumber(name, text, rule) {
  if (NOT_FINITE.test(text)) return `${name} must be a finite number, got ${quoted(text)}.`;
  if (!FLOAT.test(text)) return `${name} must be a number, got ${quoted(text)}.`;
  const value = Number(text.replace(/_/g, ""));
  if (!Number.isFinite(value)) return `${name} must be a finite number, got ${quoted(text)}.`;
  if (rule.minimum !== undefined && value < rule.minimum) {
    return `${name} must be at least ${bound(rule.minimum, rule.type)}, got ${quoted(text)}.`;
  }
  if (rule.maximum !== undefined && value > rule.maximum) {
    return `${name} must be at most ${bound(rule.maximum, rule.type)}, got ${quoted(text)}.`;
  }
  return null;
}

// {field, message} for the first problem among `values` (name -> raw string), or null.
export function checkParameters(values) {
  for (const name of PARAMETERS) {
    if (values[name] === undefined) continue;
    const message = checkValue(name, String(values[name]));
    if (message) return { field: name, message };
  }
  return null;
}

// The problem with one file to upload, or null: present, not empty, under the upload limit once the
// server has told it. Whether it is audio is the server's to say (it decodes more than browsers do).
// In a batch the server names the input first ("a.wav: The uploaded file is empty."), so does this.
export function checkFile(file, inBatch = false) {
  if (!file) return "No audio chosen: pick a WAV, FLAC or OGG file.";
  if (file.size === 0) return inBatch ? `${file.name}: The uploaded file is empty.` : "The uploaded file is empty.";
  if (limits.uploadBytes && file.size > limits.uploadBytes) {
    const mb = limits.uploadBytes / 1024 / 1024;
    return `${file.name}: the upload is larger than the limit of ${mb} MB (PERSONAPLEX_MAX_UPLOAD_MB).`;
  }
  return null;
}

export function checkTotalSize(files) {
  const total = files.reduce((sum, file) => sum + file.size, 0);
  if (limits.uploadBytes && total > limits.uploadBytes) {
    const mb = limits.uploadBytes / 1024 / 1024;
    return `The upload is larger than the limit of ${mb} MB (PERSONAPLEX_MAX_UPLOAD_MB).`;
  }
  return null;
}
