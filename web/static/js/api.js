// How every page of the web tier talks to the API: one key, one error shape.
// The API key lives in sessionStorage: entered once, kept while the tab is open, never written to disk.

const KEY_NAME = "personaplex.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY_NAME) || "";

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_NAME, value);
  else sessionStorage.removeItem(KEY_NAME);
}

export const authHeaders = () => (apiKey() ? { Authorization: "Bearer " + apiKey() } : {});

// A non-2xx answer: `status`, the server's own `message` (its JSON `error`), the whole `body`, and
// `retryAfter` (seconds, from the Retry-After header of a 429 or 503) where the server gave one.
export class ApiError extends Error {
  constructor(status, message, body, retryAfter) {
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }

  // What a user reads: 401 and 429 said plainly, everything else as the server wrote it.
  describe() {
    if (this.status === 401) return "401: the API key is missing or wrong. Enter it above. (" + this.message + ")";
    if (this.status === 429) return `429: the queue is full; retry in ${this.retryAfter || "a few"} s. (${this.message})`;
    return `${this.status}: ${this.message}`;
  }
}

// fetch() with the key; resolves to the parsed JSON (or the Response with `raw: true`), rejects with ApiError.
export async function api(path, { method = "GET", body, raw = false } = {}) {
  const response = await fetch(path, { method, body, headers: authHeaders() });
  if (!response.ok) {
    let payload = {};
    try {
      payload = await response.json();
    } catch {
      payload = { error: response.statusText };
    }
    const retryAfter = response.headers.get("Retry-After");
    throw new ApiError(response.status, payload.error || response.statusText, payload, retryAfter && Number(retryAfter));
  }
  return raw ? response : response.json();
}

// A ws:// or wss:// URL of this server; browsers cannot set headers on a WebSocket, so the key
// rides as ?access_token=.
export function socketUrl(path, query = {}) {
  const params = new URLSearchParams(query);
  if (apiKey()) params.set("access_token", apiKey());
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const search = params.toString();
  return `${scheme}://${location.host}${path}${search ? "?" + search : ""}`;
}
