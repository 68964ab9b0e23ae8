// The captions page: microphone or file -> 16 kHz s16le PCM -> the gateway's /v1/listen WebSocket (Deepgram's
// streaming API); interim text in grey, finals in black with speaker and time. And the session browser.
"use strict";

const CHUNK_SAMPLES = 1600; // 100 ms at 16 kHz per binary frame
const SAMPLE_RATE = 16000;
// The AudioWorklet that turns the context's float samples into s16le frames; a Blob keeps the page one script.
const CAPTURE_WORKLET = `
class PcmCapture extends AudioWorkletProcessor {
  constructor() { super(); this.frame = new Int16Array(${CHUNK_SAMPLES}); this.filled = 0; }
  process(inputs) {
    const samples = inputs[0][0];
    if (samples) {
      for (let i = 0; i < samples.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.filled === this.frame.length) {
          this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
          this.frame = new Int16Array(${CHUNK_SAMPLES});
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("pcm-capture", PcmCapture);
`;

const $ = (id) => document.getElementById(id);
let config = { gateway_url: "", key_parameter: "token" };
let live = null; // {socket, context, stream, source, sessionId, sentSamples}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = (seconds - m * 60).toFixed(1).padStart(4, "0");
  return `${String(m).padStart(2, "0")}:${s}`;
}

function setState(text, isError = false) {
  $("state").textContent = text;
  $("state").classList.toggle("error", isError);
}

function finalLine(start, end, speaker, text) {
  const li = document.createElement("li");
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = `${clock(start)}–${clock(end)}`;
  li.append(time);
  if (speaker !== null && speaker !== undefined && speaker !== "") {
    const who = document.createElement("span");
    who.className = "speaker";
    who.textContent = `${speaker}:`;
    li.append(who);
  }
  li.append(document.createTextNode(text));
  return li;
}

function onResults(message) {
  const alternative = message.channel.alternatives[0];
  const text = alternative.transcript;
  if (!message.is_final) {
    $("interim").textContent = text;
    return;
  }
  $("interim").textContent = "";
  if (!text) return;
  const speaker = (alternative.words || []).map((w) => w.speaker).find((s) => s !== undefined && s !== null);
  $("finals").append(finalLine(message.start, message.start + message.duration, speaker, text));
}

function onMessage(event) {
  const message = JSON.parse(event.data);
  if (message.type === "Results") onResults(message);
  else if (message.type === "Error" || message.err_code) setState(message.description || message.err_msg, true);
}

// A jetscribe extension of /v1/listen: the page names the session, so the browser below can find it.
function newSessionId() {
  return `live-${new Date().toISOString().replace(/[-:T]/g, "").slice(0, 14)}-${Math.random().toString(36).slice(2, 8)}`;
}

function listenUrl(sessionId) {
  const url = new URL("/v1/listen", $("gateway").value);
  const query = {
    encoding: "linear16", sample_rate: SAMPLE_RATE, channels: 1, interim_results: "true",
    language: $("language").value || "en", session_id: sessionId, [config.key_parameter]: $("key").value,
  };
  for (const [name, value] of Object.entries(query)) url.searchParams.set(name, value);
  return url.toString();
}

function openSocket(sessionId) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(listenUrl(sessionId));
    socket.binaryType = "arraybuffer";
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new Error("the gateway refused the WebSocket (its URL? the API key?)"));
    socket.onmessage = onMessage;
  });
}

async function audioSource(context) {
  if (document.querySelector("input[name=source]:checked").value === "microphone") {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    return { node: context.createMediaStreamSource(stream), stream };
  }
  const file = $("file").files[0];
  if (!file) throw new Error("choose an audio file first");
  const buffer = await context.decodeAudioData(await file.arrayBuffer());
  const node = context.createBufferSource();
  node.buffer = buffer;
  node.connect(context.destination); // the file is heard while it is captioned
  node.onended = () => stop();
  node.start();
  return { node, stream: null };
}

async function start() {
  localStorage.setItem("jetscribe-key", $("key").value);
  $("finals").replaceChildren();
  $("interim").textContent = "";
  $("start").disabled = true;
  try {
    const context = new AudioContext({ sampleRate: SAMPLE_RATE });
    const moduleUrl = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: "text/javascript" }));
    await context.audioWorklet.addModule(moduleUrl);
    const sessionId = newSessionId();
    const socket = await openSocket(sessionId);
    $("live").dataset.session = sessionId;
    const capture = new AudioWorkletNode(context, "pcm-capture");
    let sentSamples = 0;
    capture.port.onmessage = (event) => {
      if (socket.readyState !== WebSocket.OPEN) return;
      socket.send(event.data);
      sentSamples += event.data.byteLength / 2;
      $("live").dataset.sentSeconds = (sentSamples / SAMPLE_RATE).toFixed(1);
      if (live && live.source) setState(`streaming session ${sessionId}: ${clock(sentSamples / SAMPLE_RATE)} sent`);
    };
    socket.onclose = (event) => {
      const ended = event.code === 1000;
      setState(ended ? `session ${sessionId} ended` : `closed: ${event.code} ${event.reason}`, !ended);
      $("live").dataset.closed = ended ? "ended" : String(event.code);
      release();
    };
    const source = await audioSource(context);
    source.node.connect(capture);
    live = { socket, context, stream: source.stream, source: source.node, sessionId };
    setState(`streaming session ${sessionId}`);
    $("stop").disabled = false;
  } catch (error) {
    setState(String(error.message || error), true);
    release();
  }
}

// CloseStream: the gateway ends the session, sends its last finals, then closes the socket (a Finalize first
// would only flush the same utterance).
function stop() {
  if (!live || !live.source) return; // not streaming, or already finishing
  $("stop").disabled = true;
  live.source.disconnect();
  live.source = null;
  if (live.socket.readyState === WebSocket.OPEN) {
    live.socket.send(JSON.stringify({ type: "CloseStream" }));
    setState(`finishing session ${live.sessionId}`);
  }
}

function release() {
  if (live) {
    if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
    live.context.close();
    live = null;
  }
  $("start").disabled = false;
  $("stop").disabled = true;
}

// --- the session browser --------------------------------------------------------------------------------
async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Token ${$("key").value}` } });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.message || `${response.status} ${response.statusText}`);
  }
  return response;
}

async function listSessions() {
  localStorage.setItem("jetscribe-key", $("key").value);
  const rows = $("sessions").querySelector("tbody");
  try {
    const sessions = await (await api("/api/sessions")).json();
    rows.replaceChildren(
      ...sessions.map((s) => {
        const tr = document.createElement("tr");
        tr.dataset.session = s.session_id;
        const started = s.created_at ? new Date(s.created_at).toLocaleString() : "-";
        for (const cell of [s.session_id, s.status, started, s.audio_seconds.toFixed(1), s.segment_count]) {
          const td = document.createElement("td");
          td.textContent = cell;
          tr.append(td);
        }
        tr.onclick = () => openSession(s.session_id);
        return tr;
      }),
    );
  } catch (error) {
    setState(String(error.message), true);
  }
}

async function openSession(sessionId) {
  try {
    const session = await (await api(`/api/sessions/${encodeURIComponent(sessionId)}`)).json();
    $("opened").hidden = false;
    $("opened").dataset.session = sessionId;
    $("opened-title").textContent = `${sessionId} (${session.status})`;
    $("opened-finals").replaceChildren(...session.finals.map((f) => finalLine(f.start, f.end, f.speaker, f.text)));
  } catch (error) {
    setState(String(error.message), true);
  }
}

async function exportSession(fmt) {
  const sessionId = $("opened").dataset.session;
  try {
    const response = await api(`/api/sessions/${encodeURIComponent(sessionId)}/export?format=${fmt}`);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${sessionId}.${fmt}`;
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) {
    setState(String(error.message), true);
  }
}

async function init() {
  config = await (await fetch("/config.json")).json();
  $("gateway").value = config.gateway_url;
  $("key").value = localStorage.getItem("jetscribe-key") || "";
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("refresh").onclick = listSessions;
  for (const button of document.querySelectorAll("[data-export]")) {
    button.onclick = () => exportSession(button.dataset.export);
  }
  document.body.dataset.ready = "true";
}

init();
