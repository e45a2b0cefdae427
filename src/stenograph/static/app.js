// Live captions and file transcription against the server this page is served from.
//
// URLs are resolved relative to the page (served at <root>/app/), so the page also works behind a path
// prefix. Every connection and upload starts with a fresh access token from <root>/app/token.

const PAGE = new URL(".", location.href);
const ROOT = new URL("..", PAGE);
const TARGET_RATE = 16000;
const FRAME_MS = 100;
const MAX_QUEUED_FRAMES = 50; // audio kept while the socket opens (5 s); older frames are dropped
const FINALIZE_AFTER_MS = 700; // trailing silence after which the page sends `finalize`
const MIN_SPEECH_MS = 200; // shorter bursts (clicks, a cough) do not make an utterance
const STOP_TIMEOUT_MS = 15000; // how long to wait for the last finals after Stop

const $ = (id) => document.getElementById(id);

class PageError extends Error {}

// ---------------------------------------------------------------------------------------------------------
// Tokens

async function fetchToken() {
  let response;
  try {
    response = await fetch(new URL("token", PAGE), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
      cache: "no-store",
    });
  } catch {
    throw new PageError("The server cannot be reached. Is it still running?");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.token) {
    throw new PageError(body.message || `The server refused a page token (HTTP ${response.status}).`);
  }
  return body.token;
}

// ---------------------------------------------------------------------------------------------------------
// Status pills, notices, statistics

const PHASE_LABELS = { idle: "Idle", connecting: "Connecting…", listening: "Listening", stopping: "Finishing…", error: "Error" };

function setPhase(phase) {
  document.body.dataset.phase = phase;
  $("status").dataset.state = phase;
  $("status-text").textContent = PHASE_LABELS[phase];
  const busy = phase === "connecting" || phase === "listening" || phase === "stopping";
  $("toggle").textContent = busy ? (phase === "stopping" ? "Finishing…" : "Stop") : "Start";
  $("toggle").disabled = phase === "stopping";
  $("toggle").classList.toggle("danger", phase === "listening" || phase === "connecting");
  for (const el of $("live-form").querySelectorAll("input, select")) el.disabled = busy;
  if (!busy) syncControls();
}

function showNotice(element, message, kind = "error") {
  element.textContent = message;
  element.dataset.kind = kind;
  element.hidden = !message;
}

function micErrorMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this page (the icon in the address bar) and press Start again. You can still transcribe a file.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be opened; another application may be using it.";
    default:
      return `The microphone could not be started: ${error && error.message ? error.message : error}`;
  }
}

const latencies = [];

function recordLatency(ms) {
  latencies.push(ms);
  const sorted = [...latencies].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  $("stat-last").textContent = formatMs(ms);
  $("stat-median").textContent = formatMs(median);
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// ---------------------------------------------------------------------------------------------------------
// Caption list: one <li> per utterance (manual endpoint) or per turn (turns endpoint)

class Caption {
  constructor(label) {
    this.settledText = "";
    this.item = document.createElement("li");
    this.item.className = "utterance open";
    const meta = document.createElement("div");
    meta.className = "meta";
    this.labelEl = document.createElement("span");
    this.labelEl.className = "label";
    this.labelEl.textContent = label;
    this.stateEl = document.createElement("span");
    this.stateEl.className = "state";
    this.latencyEl = document.createElement("span");
    this.latencyEl.className = "latency";
    meta.append(this.labelEl, this.stateEl, this.latencyEl);
    const body = document.createElement("p");
    body.className = "line";
    this.finalEl = document.createElement("span");
    this.finalEl.className = "text";
    this.interimEl = document.createElement("span");
    this.interimEl.className = "interim";
    body.append(this.finalEl, this.interimEl);
    this.item.append(meta, body);
    $("captions").append(this.item);
    $("captions-empty").hidden = true;
    this.item.scrollIntoView({ block: "nearest" });
  }

  setState(text, name) {
    this.stateEl.textContent = text;
    this.item.dataset.state = name;
  }

  // Manual endpoint: finals are deltas appended verbatim; an interim replaces the previous interim.
  appendFinal(text) {
    this.settledText += text;
    this.finalEl.textContent = this.settledText.trimStart();
    this.interimEl.textContent = "";
  }

  setInterim(text) {
    this.interimEl.textContent = this.settledText ? text : text.trimStart();
    this.item.dataset.interims = String(Number(this.item.dataset.interims || 0) + 1);
  }

  // Turns endpoint: the transcript is cumulative and is never revised, only extended.
  setTurnText(text) {
    this.settledText = text;
    this.finalEl.textContent = text.trim();
  }

  settle(latencyMs, title) {
    this.item.classList.remove("open");
    this.item.classList.add("settled");
    this.interimEl.textContent = "";
    if (latencyMs !== null) {
      this.item.dataset.latencyMs = String(Math.round(latencyMs));
      this.latencyEl.textContent = formatMs(latencyMs);
      this.latencyEl.title = title;
      recordLatency(latencyMs);
    }
    this.item.scrollIntoView({ block: "nearest" });
  }

  get empty() {
    return !this.settledText.trim() && !this.interimEl.textContent.trim();
  }

  remove() {
    this.item.remove();
  }
}

function countUtterances() {
  $("stat-count").textContent = String($("captions").querySelectorAll(".utterance.settled").length);
}

// ---------------------------------------------------------------------------------------------------------
// Microphone capture: AudioWorklet -> 16 kHz frames, plus a simple energy detector for where speech ends

class Microphone {
  constructor(encoding, onFrame) {
    this.encoding = encoding;
    this.onFrame = onFrame;
  }

  async open() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new PageError("This page can only use the microphone over HTTPS or on localhost. Open it that way, or transcribe a file instead.");
    }
    if (typeof AudioWorkletNode === "undefined") {
      throw new PageError("This browser has no AudioWorklet support; use a current Chrome, Edge, Firefox or Safari.");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true },
      });
    } catch (error) {
      throw new PageError(micErrorMessage(error));
    }
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule(new URL("capture-worklet.js", PAGE));
    this.node = new AudioWorkletNode(this.context, "stenograph-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      processorOptions: { targetRate: TARGET_RATE, frameMs: FRAME_MS, encoding: this.encoding },
    });
    this.node.port.onmessage = (event) => this.onFrame(event.data.audio, event.data.rms);
    this.source = this.context.createMediaStreamSource(this.stream);
    this.source.connect(this.node);
    await this.context.resume();
  }

  close() {
    if (this.node) this.node.port.onmessage = null;
    if (this.source) this.source.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.context) this.context.close().catch(() => {});
  }
}

// Speech vs. silence per frame, against a noise floor that follows the quietest recent level.
class SpeechDetector {
  constructor() {
    this.floorDb = -60;
    this.speechMs = 0;
    this.silenceMs = 0;
    this.inSpeech = false;
    this.voiced = false;
    this.lastVoiceAt = null;
    this.speechEndAt = null; // when the latest stretch of speech ended (its last voiced frame)
  }

  // Returns "end" on the frame where an utterance's trailing silence reaches FINALIZE_AFTER_MS.
  update(rms, now) {
    const db = 20 * Math.log10(Math.max(rms, 1e-5));
    this.floorDb = db < this.floorDb ? db : Math.min(this.floorDb + 0.05, db);
    const voiced = db > Math.max(this.floorDb + 15, -50);
    if (this.voiced && !voiced) this.speechEndAt = this.lastVoiceAt;
    this.voiced = voiced;
    if (voiced) {
      this.speechMs += FRAME_MS;
      this.silenceMs = 0;
      this.lastVoiceAt = now;
      if (this.speechMs >= MIN_SPEECH_MS) this.inSpeech = true;
      return "speech";
    }
    this.silenceMs += FRAME_MS;
    if (this.silenceMs >= 300) this.speechMs = 0;
    if (this.inSpeech && this.silenceMs >= FINALIZE_AFTER_MS) {
      this.inSpeech = false;
      return "end";
    }
    return "silence";
  }
}

// ---------------------------------------------------------------------------------------------------------
// A live session over one WebSocket

class LiveSession {
  constructor(options) {
    this.mode = options.mode; // "manual" | "turns"
    this.options = options;
    this.queue = [];
    this.detector = new SpeechDetector();
    this.caption = null;
    this.finalizeAt = null;
    this.stopping = false;
    this.finished = false;
  }

  url(token) {
    const path = this.mode === "turns" ? "stt/turns/websocket" : "stt/websocket";
    const url = new URL(path, ROOT);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const params = { model: this.options.model, encoding: this.options.encoding, sample_rate: String(TARGET_RATE), access_token: token };
    if (this.mode === "manual") params.language = this.options.language;
    for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
    return url;
  }

  async start() {
    setPhase("connecting");
    showNotice($("notice"), "");
    // The token first: if the page is not enabled, say so before asking for the microphone.
    const token = await fetchToken();
    this.mic = new Microphone(this.options.encoding, (audio, rms) => this.onFrame(audio, rms));
    await this.mic.open();
    if (this.stopping) {
      this.mic.close(); // Stop was pressed while the browser asked for the microphone
      return;
    }
    this.socket = new WebSocket(this.url(token));
    this.socket.binaryType = "arraybuffer";
    this.socket.onopen = () => {
      for (const frame of this.queue) this.socket.send(frame);
      this.queue = [];
      if (this.mode === "manual") setPhase("listening");
    };
    this.socket.onmessage = (event) => this.onMessage(JSON.parse(event.data));
    this.socket.onclose = (event) => this.onClose(event);
  }

  onFrame(audio, rms) {
    $("level").style.transform = `scaleX(${Math.min(1, Math.sqrt(rms) * 2.2).toFixed(3)})`;
    if (this.stopping) return;
    if (!this.socket || this.socket.readyState === WebSocket.CONNECTING) {
      this.queue.push(audio);
      if (this.queue.length > MAX_QUEUED_FRAMES) this.queue.shift();
      return;
    }
    if (this.socket.readyState !== WebSocket.OPEN) return;
    this.socket.send(audio);
    const now = performance.now();
    const speech = this.detector.update(rms, now);
    if (speech === "end" && this.mode === "manual" && this.finalizeAt === null) {
      this.socket.send("finalize");
      this.finalizeAt = now;
      if (this.caption) this.caption.setState("finalizing", "finalizing");
    }
  }

  onMessage(event) {
    if (event.type === "error") {
      showNotice($("notice"), `${event.title || "Error"}: ${event.message || "the server reported an error"}`);
      return;
    }
    if (this.mode === "manual") this.onManualEvent(event);
    else this.onTurnEvent(event);
  }

  openCaption() {
    if (!this.caption) {
      captionNumber += 1;
      this.caption = new Caption(this.mode === "turns" ? `Turn ${captionNumber}` : `#${captionNumber}`);
    }
    return this.caption;
  }

  onManualEvent(event) {
    if (event.type === "transcript") {
      if (!event.text && !this.caption) return;
      const caption = this.openCaption();
      if (event.is_final) {
        caption.appendFinal(event.text);
        // A final nobody asked for: the server ended the utterance itself (its silence timeout), which
        // is a boundary too, without a latency to show.
        if (this.finalizeAt === null) this.settleCaption(null, "");
      } else {
        caption.setInterim(event.text);
        if (this.finalizeAt === null) caption.setState("speaking", "speaking");
      }
    } else if (event.type === "flush_done") {
      const latency = this.finalizeAt === null ? null : performance.now() - this.finalizeAt;
      this.finalizeAt = null;
      this.settleCaption(latency, "finalize sent → final transcript received");
    } else if (event.type === "done") {
      this.settleCaption(null, "");
    }
  }

  onTurnEvent(event) {
    const now = performance.now();
    switch (event.type) {
      case "connected":
        setPhase("listening");
        break;
      case "turn.start":
        this.openCaption().setState("speaking", "speaking");
        break;
      case "turn.update":
        this.openCaption().setTurnText(event.transcript || "");
        break;
      case "turn.eager_end":
        this.openCaption().setState("maybe done", "eager");
        if (event.transcript) this.caption.setTurnText(event.transcript);
        break;
      case "turn.resume":
        this.openCaption().setState("speaking", "speaking");
        break;
      case "turn.end": {
        const caption = this.openCaption();
        if (event.transcript) caption.setTurnText(event.transcript);
        // Measured from the last end of speech the page heard (or its last voiced frame, when the turn
        // ended before the page's own level detector called the speech over); used once, so a turn.end
        // without new speech before it shows no latency rather than a wrong one.
        const endedAt = this.detector.speechEndAt ?? this.detector.lastVoiceAt;
        this.detector.speechEndAt = null;
        this.detector.lastVoiceAt = null;
        this.settleCaption(endedAt === null ? null : now - endedAt, "end of speech (as heard by this page) → turn.end");
        break;
      }
      default:
        break;
    }
  }

  settleCaption(latency, title) {
    const caption = this.caption;
    if (!caption) return;
    this.caption = null;
    if (caption.empty) {
      caption.remove();
      captionNumber -= 1;
      return;
    }
    caption.setState(this.mode === "turns" ? "ended" : "final", "settled");
    caption.settle(latency, title);
    countUtterances();
  }

  // Stop capturing now; the server still delivers the finals for what it already has, then closes.
  stop() {
    if (this.stopping) return;
    this.stopping = true;
    if (this.mic) this.mic.close();
    $("level").style.transform = "scaleX(0)";
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      setPhase("stopping");
      this.socket.send(this.mode === "turns" ? JSON.stringify({ type: "close" }) : "close");
      this.stopTimer = setTimeout(() => this.socket.close(1000), STOP_TIMEOUT_MS);
    } else {
      if (this.socket) this.socket.close(1000);
      this.finish();
    }
  }

  onClose(event) {
    clearTimeout(this.stopTimer);
    if (this.mic) this.mic.close();
    if (!this.stopping && event.code !== 1000) {
      const reason = event.reason ? `: ${event.reason}` : "";
      const message = event.code === 1006
        ? "Could not reach the streaming endpoint, or the server refused the connection (check the server log)."
        : `The connection closed (code ${event.code}${reason}).`;
      if ($("notice").hidden) showNotice($("notice"), message);
      this.finish("error");
      return;
    }
    this.settleCaption(null, "");
    this.finish();
  }

  finish(phase = "idle") {
    if (this.finished) return;
    this.finished = true;
    this.stopping = true;
    if (current === this) current = null;
    setPhase($("notice").hidden ? phase : "error");
  }
}

let current = null;
let captionNumber = 0; // numbered across sessions, so a second Start continues the list

function formOptions() {
  const form = $("live-form");
  return {
    mode: form.elements.endpoint.value,
    model: $("model").value,
    language: $("language").value,
    encoding: $("encoding").value,
  };
}

// The turns endpoint serves ink-2 in English only: reflect that in the controls.
function syncControls() {
  const turns = $("live-form").elements.endpoint.value === "turns";
  if (turns) {
    $("model").value = "ink-2";
    $("language").value = "en";
  }
  $("model").disabled = turns;
  $("language").disabled = turns;
  $("stat-count-label").textContent = turns ? "Turns" : "Utterances";
  $("stat-latency-label").textContent = turns ? "Turn-end latency" : "Finalize → final";
  $("stat-latency-label").title = turns
    ? "From the end of speech, as this page heard it, to turn.end"
    : "From sending finalize to receiving the final transcript";
}

async function toggleLive(event) {
  event.preventDefault();
  if (current) {
    current.stop();
    return;
  }
  const session = new LiveSession(formOptions());
  current = session;
  try {
    await session.start();
  } catch (error) {
    showNotice($("notice"), error instanceof PageError ? error.message : `Could not start: ${error.message || error}`);
    session.stop();
  }
}

// ---------------------------------------------------------------------------------------------------------
// File transcription: POST /stt with word timestamps, upload progress, words highlighted as the file plays

const FILE_LABELS = { idle: "Idle", uploading: "Uploading…", transcribing: "Transcribing…", done: "Done", error: "Error" };

function setFilePhase(phase) {
  $("file-status").dataset.state = phase === "done" ? "listening" : phase === "idle" ? "idle" : phase === "error" ? "error" : "connecting";
  $("file-status-text").textContent = FILE_LABELS[phase];
  document.body.dataset.filePhase = phase;
}

function formatBytes(bytes) {
  return bytes < 1e6 ? `${Math.round(bytes / 1e3)} kB` : `${(bytes / 1e6).toFixed(1)} MB`;
}

function upload(file, token) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("model", $("model").value);
    form.append("language", $("language").value);
    form.append("timestamp_granularities[]", "word");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL("stt", ROOT));
    xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.responseType = "json";
    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      $("upload").dataset.loaded = String(event.loaded);
      $("upload-progress").value = event.loaded / event.total;
      $("upload-text").textContent = `${Math.round((100 * event.loaded) / event.total)}% · ${formatBytes(event.loaded)} of ${formatBytes(event.total)}`;
    };
    xhr.upload.onload = () => {
      setFilePhase("transcribing");
      $("upload-progress").removeAttribute("value"); // indeterminate while the server works
      $("upload-text").textContent = "uploaded · transcribing…";
    };
    xhr.onload = () => {
      const body = xhr.response || {};
      if (xhr.status === 200) resolve(body);
      else reject(new PageError(body.message ? `${body.title || "Error"}: ${body.message}` : `The server answered HTTP ${xhr.status}.`));
    };
    xhr.onerror = () => reject(new PageError("The upload failed: the server cannot be reached."));
    xhr.send(form);
  });
}

let wordSpans = [];
let highlighted = null;

function renderWords(result) {
  const container = $("words");
  container.replaceChildren();
  wordSpans = [];
  highlighted = null;
  const words = result.words || [];
  if (!words.length) {
    container.textContent = result.text || "(no speech found)";
    return;
  }
  for (const [i, w] of words.entries()) {
    if (i) container.append(" ");
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w.word.trim();
    span.dataset.start = String(w.start);
    span.dataset.end = String(w.end);
    span.title = `${w.start.toFixed(2)} – ${w.end.toFixed(2)} s`;
    container.append(span);
    wordSpans.push({ span, start: w.start, end: w.end });
  }
}

// The word being spoken at `t`: the last one starting at or before it (binary search; words are in order).
function highlightAt(t) {
  let lo = 0;
  let hi = wordSpans.length - 1;
  let found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (wordSpans[mid].start <= t) {
      found = mid;
      lo = mid + 1;
    } else hi = mid - 1;
  }
  const next = found >= 0 && t < wordSpans[found].end + 0.15 ? wordSpans[found].span : null;
  if (next === highlighted) return;
  if (highlighted) highlighted.classList.remove("active");
  if (next) next.classList.add("active");
  highlighted = next;
  for (const [i, w] of wordSpans.entries()) w.span.classList.toggle("spoken", i < found || (i === found && !next));
}

function followPlayback() {
  const player = $("player");
  highlightAt(player.currentTime);
  if (!player.paused) requestAnimationFrame(followPlayback);
}

async function transcribeFile(file) {
  if (!file) return;
  showNotice($("file-notice"), "");
  $("words").replaceChildren();
  $("upload").hidden = false;
  $("upload-name").textContent = file.name;
  $("upload-progress").value = 0;
  $("upload").dataset.loaded = "0";
  $("upload-text").textContent = formatBytes(file.size);
  setFilePhase("uploading");
  const player = $("player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(file);
  player.hidden = false;
  try {
    const result = await upload(file, await fetchToken());
    renderWords(result);
    $("upload-progress").value = 1;
    $("upload-text").textContent = `${result.duration ? result.duration.toFixed(1) : "?"} s of audio · ${(result.words || []).length} words`;
    setFilePhase("done");
  } catch (error) {
    $("upload").hidden = true;
    showNotice($("file-notice"), error instanceof PageError ? error.message : `The upload failed: ${error.message || error}`);
    setFilePhase("error");
  }
}

function setupFileCard() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (event) => {
    transcribeFile(event.target.files[0]);
    event.target.value = ""; // choosing the same file again is a new request
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    transcribeFile(event.dataTransfer.files[0]);
  });
  const player = $("player");
  player.addEventListener("play", () => requestAnimationFrame(followPlayback));
  for (const name of ["timeupdate", "seeked"]) player.addEventListener(name, () => highlightAt(player.currentTime));
  $("words").addEventListener("click", (event) => {
    const span = event.target.closest(".word");
    if (span) player.currentTime = Number(span.dataset.start);
  });
}

// ---------------------------------------------------------------------------------------------------------

$("live-form").addEventListener("submit", toggleLive);
$("live-form").addEventListener("change", syncControls);
setupFileCard();
syncControls();
setPhase("idle");
setFilePhase("idle");
document.body.dataset.ready = "true";
