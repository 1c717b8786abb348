"""The page at ``GET /``: a text box, the voice list, a play button. The speech comes as 16-bit PCM chunked by
sentence (``stream_format="audio"``, ``response_format="pcm"``); each sentence plays as it arrives (Web Audio), and
the ``<audio>`` element holds the recording so far as a WAV after every sentence (to replay, seek or save it)."""

from __future__ import annotations

import html

__all__ = ["page_html"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bark-kernels: speech</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  textarea { width: 100%; height: 8rem; font: inherit; padding: .5rem; box-sizing: border-box; }
  .row { display: flex; gap: .75rem; align-items: center; margin: .75rem 0; flex-wrap: wrap; }
  button { font: inherit; padding: .4rem 1.2rem; }
  audio { width: 100%; margin-top: .5rem; }
  #status { color: #555; min-height: 1.5em; }
  .error { color: #b00020 !important; }
  small { color: #777; }
</style>
</head>
<body>
<h1>bark-kernels speech</h1>
<p><small>model: <code>__MODEL__</code> &middot; POST /v1/audio/speech (OpenAI-compatible) &middot;
<a href="/docs">API</a> &middot; <a href="/health">health</a></small></p>
<textarea id="text" placeholder="Type something to say. Each sentence plays as soon as it is ready."></textarea>
<div class="row">
  <label>voice <select id="voice"><option value="">(default)</option></select></label>
  <label><input type="checkbox" id="greedy"> greedy</label>
  <label>seed <input type="number" id="seed" min="0" style="width: 7rem" placeholder="none"></label>
  <button id="play">Play</button>
</div>
<div id="status"></div>
<audio id="player" controls preload="auto"></audio>
<script>
"use strict";
const RATE = 24000;
const $ = (id) => document.getElementById(id);
let context = null;

fetch("/v1/audio/voices").then((r) => r.json()).then((body) => {
  for (const name of body.voices) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    if (name === body.default) option.selected = true;
    $("voice").appendChild(option);
  }
}).catch((e) => status("cannot list the voices: " + e, true));

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function wav(chunks, samples) {
  const out = new DataView(new ArrayBuffer(44 + 2 * samples));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); out.setUint32(4, 36 + 2 * samples, true); text(8, "WAVE"); text(12, "fmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, RATE, true); out.setUint32(28, 2 * RATE, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, 2 * samples, true);
  let at = 44;
  for (const c of chunks) { new Uint8Array(out.buffer, at, c.length).set(c); at += c.length; }
  return new Blob([out.buffer], { type: "audio/wav" });
}

function playNow(pcm, when) {  // schedule 16-bit samples on the Web Audio clock; returns the end time
  if (!context) return when;
  const n = pcm.length / 2, view = new DataView(pcm.buffer, pcm.byteOffset, pcm.length);
  if (!n) return when;
  const buffer = context.createBuffer(1, n, RATE), data = buffer.getChannelData(0);
  for (let i = 0; i < n; i++) data[i] = view.getInt16(2 * i, true) / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer; source.connect(context.destination);
  const start = Math.max(when, context.currentTime);
  source.start(start);
  return start + n / RATE;
}

async function speak() {
  const input = $("text").value;
  if (!input.trim()) { status("type something to say first", true); return; }
  $("play").disabled = true;
  try {
    context = context || new (window.AudioContext || window.webkitAudioContext)({ sampleRate: RATE });
  } catch (e) { context = null; }
  const body = { model: "bark", input, response_format: "pcm", stream_format: "audio",
                 greedy: $("greedy").checked };
  if ($("voice").value) body.voice = $("voice").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const t0 = performance.now();
  status("generating ...");
  try {
    const response = await fetch("/v1/audio/speech", { method: "POST", headers: { "Content-Type": "application/json" },
                                                       body: JSON.stringify(body) });
    if (!response.ok) {
      const text = await response.text();
      let message = text;
      try { message = JSON.parse(text).error.message; } catch (e) { /* not JSON */ }
      throw new Error(response.status + ": " + message);
    }
    const reader = response.body.getReader(), chunks = [];
    let samples = 0, when = 0, odd = new Uint8Array(0), first = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (odd.length) {
        bytes = new Uint8Array(odd.length + value.length); bytes.set(odd); bytes.set(value, odd.length);
      }
      const even = bytes.length - (bytes.length % 2);
      odd = bytes.slice(even);
      const pcm = bytes.slice(0, even);
      if (!pcm.length) continue;
      if (first === null) first = (performance.now() - t0) / 1000;
      chunks.push(pcm); samples += pcm.length / 2;
      when = playNow(pcm, when);
      status("first audio after " + first.toFixed(2) + " s; " + (samples / RATE).toFixed(2) + " s so far ...");
      if ($("player").paused) $("player").src = URL.createObjectURL(wav(chunks, samples));
    }
    $("player").src = URL.createObjectURL(wav(chunks, samples));
    $("player").load();
    status("done: " + (samples / RATE).toFixed(2) + " s of audio in " + ((performance.now() - t0) / 1000).toFixed(2) +
           " s (first audio after " + (first === null ? "-" : first.toFixed(2)) + " s)");
  } catch (e) {
    status("failed: " + e.message, true);
  } finally {
    $("play").disabled = false;
  }
}
$("play").addEventListener("click", speak);
</script>
</body>
</html>
"""


def page_html(model_name: str) -> str:
    """The page, naming ``model_name`` (escaped for HTML and for the script's string)."""
    safe = html.escape(model_name, quote=True).replace("\\", "\\\\")
    return _PAGE.replace("__MODEL__", safe)
