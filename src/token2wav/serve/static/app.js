// token2wav web page: streams speech tokens to /v1/stream and plays the audio chunks gaplessly (Web Audio,
// scheduled on the audio clock). No dependencies; everything it loads comes from the server that served it.
// The live state is window.t2w.state (read by the browser test).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const st = {
    phase: "idle", // idle | connecting | streaming | done | error | stopped
    model: null,
    sampleRate: 0,
    tokenRate: 0,
    tokensTotal: 0,
    tokensSent: 0,
    sends: [], // {t: ms since Speak, n: tokens in the message, total: tokens sent so far}
    chunks: [], // {index, samples, computeMs, arrivedMs, start, end, gapS} (start/end: audio clock, seconds)
    firstTokensAt: null, // performance.now() when the first 'tokens' message was sent
    firstChunkMs: null, // first chunk's audio received - firstTokensAt
    underruns: 0, // stalls: chunks that arrived after the audio before them had finished playing
    underrunS: 0, // their total length (s)
    worstStallS: 0, // the longest one (s)
    recommendedBufferMs: null, // the server's newest start_buffer_ms (null: it sent none)
    startBufferMs: null, // the start buffer used: the field's value, else the recommendation, else 500 ms
    playedAtDone: false, // the stream ended while buffering, so playback started then (nothing left to wait for)
    doneAudioS: null, // the audio clock when the 'done' message arrived
    computeMs: 0,
    audioSeconds: 0,
    rtf: null,
    done: null, // the server's 'done' message
    error: null,
    voices: null,
    uploads: [], // {prompt_id, name}
  };
  const run = { ws: null, ctx: null, t0: 0, timer: null, header: null, nextTime: null, clockOffset: 0,
                pcm: [], tokens: [], slowed: false, sources: [], bufferS: null, firstAt: null, playStart: null };
  const DEFAULT_BUFFER_MS = 500; // the start buffer when the field is empty and the server recommends none
  window.t2w = { state: st };

  // ---------------------------------------------------------------- helpers
  function showError(msg) {
    st.error = msg;
    const box = $("error");
    box.textContent = msg;
    box.hidden = false;
  }
  function clearError() {
    st.error = null;
    $("error").hidden = true;
    $("error").textContent = "";
  }
  function key() {
    return $("key").value.trim();
  }
  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (key()) h.Authorization = "Bearer " + key();
    return h;
  }
  async function api(path, opts) {
    const o = Object.assign({}, opts || {});
    o.headers = authHeaders(o.headers);
    let resp;
    try {
      resp = await fetch(path, o);
    } catch (e) {
      throw new Error("cannot reach the server (" + path + "): " + e.message);
    }
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!resp.ok) {
      const why = body && body.error ? body.error : text.slice(0, 200) || resp.statusText;
      throw new Error("server error " + resp.status + " (" + path.split("?")[0] + "): " + why);
    }
    return body;
  }
  function option(value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    return o;
  }
  function fmtMs(ms) {
    return ms == null ? "\u2013" : Math.round(ms) + " ms";
  }
  // the server's recommended start buffer in a 'started' or 'chunk' message (null: none, an older server)
  function recommendedMs(msg) {
    const v = msg.start_buffer_ms;
    return typeof v === "number" && isFinite(v) && v >= 0 ? Math.round(v) : null;
  }

  // ---------------------------------------------------------------- tokens
  // LLM output: <|s_N|> markers anywhere in the text; otherwise a list of integers (spaces, commas, brackets).
  function parseTokens(text) {
    const markers = [...text.matchAll(/<\|s_(-?\d+)\|>/g)].map((m) => Number(m[1]));
    if (markers.length) return markers;
    const rest = text.replace(/[\s,;[\]()]+/g, " ").trim();
    if (!rest) throw new Error("no tokens: paste speech token ids or text with <|s_N|> markers");
    const out = [];
    for (const word of rest.split(" ")) {
      if (!/^[-+]?\d+$/.test(word)) {
        throw new Error("not a token: " + JSON.stringify(word.slice(0, 20)) +
                        " (expected integers or <|s_N|> markers)");
      }
      out.push(Number(word));
    }
    return out;
  }

  function selectedSource() {
    return document.querySelector("input[name=source]:checked").value;
  }
  function tokensToSay() {
    if (selectedSource() === "utterance") {
      const u = window.t2w.utterances[Number($("utterance").value)];
      if (!u) throw new Error("this model ships no held-out utterances: paste tokens instead");
      return u.tokens.slice();
    }
    return parseTokens($("tokens").value);
  }

  // ---------------------------------------------------------------- loading the model's facts
  async function loadVoices(selectId) {
    const v = await api("/v1/voices");
    st.voices = v;
    const sel = $("voice");
    const keep = selectId || sel.value;
    sel.replaceChildren(option("", "(no prompt)"));
    if (v.speakers.length) {
      const g = document.createElement("optgroup");
      g.label = "bundled voices";
      v.speakers.forEach((s) => g.appendChild(option(s.prompt_id, s.name)));
      sel.appendChild(g);
    }
    const known = new Map(st.uploads.map((u) => [u.prompt_id, u.name]));
    if (v.prompts.length) {
      const g = document.createElement("optgroup");
      g.label = "registered prompts";
      v.prompts.forEach((p) => g.appendChild(option(p, known.get(p) || p)));
      sel.appendChild(g);
    }
    if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
    else if (v.speakers.length) sel.value = v.speakers[0].prompt_id;
    voiceChanged();
    const cs = $("clone-speaker");
    cs.replaceChildren(...v.speakers.map((s) => option(s.name, s.name)));
    $("clone-speaker-label").hidden = !v.clone_needs_speaker;
    $("clone-hint").textContent = !v.clone ? "This server's model cannot clone a voice from a recording." :
      v.clone_needs_speaker ? "The recording gives the prompt's tokens and mel; this model has no speaker " +
        "encoder, so the clone takes the speaker embedding of the voice chosen here." :
        "The server clones the recording (speech tokenizer and speaker model of the release).";
    $("say-like").hidden = !v.tokenize;
  }

  // a bundled voice suggests its low-latency hop (no alignment pad after its prompt) unless the user set one
  function voiceChanged() {
    const hop = $("hop");
    const sp = st.voices && st.voices.speakers.find((s) => s.prompt_id === $("voice").value);
    if (hop.dataset.user !== "1") hop.value = sp && sp.low_latency_hop ? sp.low_latency_hop : "";
  }

  async function init() {
    const fromUrl = new URLSearchParams(location.search).get("token");
    if (fromUrl) $("key").value = fromUrl;
    try {
      const m = (await api("/v1/models")).models[0];
      st.model = m;
      st.sampleRate = m.sample_rate;
      st.tokenRate = m.token_rate;
      const params = m.parameters ? (m.parameters.total / 1e6).toFixed(1) + " M parameters, " : "";
      $("model-line").textContent = "model " + m.name + ": " + params + m.sample_rate + " Hz, " +
        m.token_rate.toFixed(2) + " tokens/s, chunk " + m.chunk_tokens + " tokens";
      const ps = $("preset");
      ps.replaceChildren(option("", "(none: one chunk per hop)"));
      Object.keys(m.presets || {}).forEach((p) => ps.appendChild(option(p, p + " \u2013 " + m.presets[p].summary)));
      ps.value = m.presets && m.presets.assistant ? "assistant" : "";
      const hop = $("hop");
      const look = $("lookahead");
      let hint = "";
      if (m.supported_chunk_tokens) {
        hop.min = m.supported_chunk_tokens[0];
        hop.max = 1000;
        hint += "Hop: " + m.supported_chunk_tokens[0] + ".." + m.supported_chunk_tokens[1] +
          " tokens, or a multiple of the chunk (" + m.chunk_tokens + "). ";
      } else {
        hop.min = m.chunk_tokens;
        hop.step = m.chunk_tokens;
        hint += "Hop: a multiple of the chunk (" + m.chunk_tokens + " tokens). ";
      }
      look.value = m.pre_lookahead_len;
      if (m.supported_pre_lookahead) {
        look.min = m.supported_pre_lookahead[0];
        look.max = m.supported_pre_lookahead[1];
        hint += "Lookahead: " + look.min + ".." + look.max + " tokens.";
      } else {
        look.disabled = true;
        hint += "Lookahead: fixed at the trained " + m.pre_lookahead_len + " tokens.";
      }
      $("settings-hint").textContent = hint;
      $("rate").value = Math.round(m.token_rate);
      const u = await api("/v1/utterances");
      window.t2w.utterances = u.utterances;
      const us = $("utterance");
      us.replaceChildren(...u.utterances.map((x, i) =>
        option(String(i), (x.speaker ? "[" + x.speaker + "] " : "") + x.text + " (" + x.tokens.length + " tokens)")));
      if (!u.utterances.length) {
        document.querySelector("input[name=source][value=tokens]").checked = true;
        us.disabled = true;
      }
      await loadVoices();
      $("speak").disabled = false;
      st.phase = "idle";
      window.t2w.ready = true;
    } catch (e) {
      showError(e.message);
      window.t2w.ready = true;
    }
    draw();
  }

  // ---------------------------------------------------------------- voices from recordings
  async function uploadVoice(blob, name) {
    clearError();
    const type = blob.type && blob.type.startsWith("audio/") ? blob.type : "audio/wav";
    let path = "/v1/prompts";
    if (st.voices && st.voices.clone_needs_speaker) path += "?speaker=" + encodeURIComponent($("clone-speaker").value);
    $("voice-upload").disabled = true;
    try {
      const r = await api(path, { method: "POST", headers: { "Content-Type": type }, body: blob });
      st.uploads.push({ prompt_id: r.prompt_id, name: name + " (" + r.prompt_id.slice(0, 10) + ")" });
      await loadVoices(r.prompt_id);
      st.lastUpload = r;
      return r;
    } catch (e) {
      showError(e.message);
      return null;
    } finally {
      $("voice-upload").disabled = false;
    }
  }

  const rec = { stream: null, ctx: null, node: null, parts: [], rate: 0 };
  async function toggleRecord() {
    if (rec.node) {
      rec.node.disconnect();
      rec.stream.getTracks().forEach((t) => t.stop());
      await rec.ctx.close();
      rec.node = null;
      const n = rec.parts.reduce((a, p) => a + p.length, 0);
      const all = new Float32Array(n);
      let o = 0;
      for (const p of rec.parts) { all.set(p, o); o += p.length; }
      $("rec").textContent = "Record with the microphone";
      $("rec-status").textContent = (n / rec.rate).toFixed(1) + " s recorded, uploading\u2026";
      const r = await uploadVoice(wavBlob([all], rec.rate), "recording");
      $("rec-status").textContent = r ? "registered as " + r.prompt_id : "";
      return;
    }
    try {
      rec.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      showError("microphone not available: " + e.message);
      return;
    }
    rec.ctx = new AudioContext();
    rec.rate = rec.ctx.sampleRate;
    rec.parts = [];
    const src = rec.ctx.createMediaStreamSource(rec.stream);
    rec.node = rec.ctx.createScriptProcessor(4096, 1, 1);
    rec.node.onaudioprocess = (ev) => rec.parts.push(new Float32Array(ev.inputBuffer.getChannelData(0)));
    src.connect(rec.node);
    rec.node.connect(rec.ctx.destination);
    $("rec").textContent = "Stop recording and upload";
    $("rec-status").textContent = "recording (0.5 to 30 s)\u2026";
  }

  async function tokenizeRecording() {
    clearError();
    const f = $("say-file").files[0];
    if (!f) { showError("choose a recording to tokenize first"); return; }
    $("tokenize-status").textContent = "tokenizing\u2026";
    try {
      const r = await api("/v1/tokenize", {
        method: "POST", headers: { "Content-Type": f.type && f.type.startsWith("audio/") ? f.type : "audio/wav" },
        body: f,
      });
      $("tokens").value = r.tokens.join(" ");
      document.querySelector("input[name=source][value=tokens]").checked = true;
      $("tokenize-status").textContent = r.tokens.length + " tokens from " + r.seconds + " s";
      st.lastTokenize = r;
    } catch (e) {
      $("tokenize-status").textContent = "";
      showError(e.message);
    }
  }

  // ---------------------------------------------------------------- WAV
  function wavBlob(parts, rate) {
    const n = parts.reduce((a, p) => a + p.length, 0);
    const buf = new ArrayBuffer(44 + 2 * n);
    const v = new DataView(buf);
    const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
    v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    str(36, "data"); v.setUint32(40, 2 * n, true);
    let o = 44;
    for (const p of parts) {
      for (let i = 0; i < p.length; i++, o += 2) {
        const x = Math.max(-1, Math.min(1, p[i]));
        v.setInt16(o, x < 0 ? Math.round(x * 32768) : Math.round(x * 32767), true);
      }
    }
    return new Blob([buf], { type: "audio/wav" });
  }

  function download() {
    if (!run.pcm.length) return;
    const url = URL.createObjectURL(wavBlob(run.pcm, st.sampleRate));
    const a = document.createElement("a");
    a.href = url;
    a.download = "token2wav.wav";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---------------------------------------------------------------- streaming
  function resetRun() {
    Object.assign(st, {
      tokensTotal: 0, tokensSent: 0, sends: [], chunks: [], firstTokensAt: null, firstChunkMs: null,
      underruns: 0, underrunS: 0, worstStallS: 0, recommendedBufferMs: null, startBufferMs: null,
      playedAtDone: false, doneAudioS: null, computeMs: 0, audioSeconds: 0, rtf: null, done: null,
    });
    run.header = null;
    run.nextTime = null;
    run.firstAt = null;
    run.playStart = null;
    run.pcm = [];
    run.slowed = false;
    run.sources = [];
  }

  function setPhase(p) {
    st.phase = p;
    $("phase").textContent = p;
    const busy = p === "connecting" || p === "streaming";
    $("speak").disabled = busy;
    $("stop").disabled = !busy;
    $("download").disabled = busy || !run.pcm.length;
  }

  async function speak() {
    clearError();
    let tokens;
    try {
      tokens = tokensToSay();
    } catch (e) {
      showError(e.message);
      return;
    }
    stopAudio();
    resetRun();
    window.t2w.playedOut = false;
    run.tokens = tokens;
    st.tokensTotal = tokens.length;
    const rate = Number($("rate").value);
    // an empty field: auto, the server's recommendation (see playChunk)
    const bufferText = $("buffer").value.trim();
    const bufferS = bufferText === "" ? null : Math.max(0, Number(bufferText) || 0) / 1000;
    // the context runs at the model's rate: chunks are played sample for sample, no resampling at the seams
    if (!run.ctx || run.ctx.sampleRate !== st.sampleRate) {
      if (run.ctx) run.ctx.close();
      run.ctx = new AudioContext({ sampleRate: st.sampleRate, latencyHint: "interactive" });
    }
    if (run.ctx.state === "suspended") await run.ctx.resume();
    const start = { type: "start" };
    if ($("voice").value) start.prompt_id = $("voice").value;
    if ($("preset").value) start.preset = $("preset").value;
    if ($("hop").value !== "") start.hop = Number($("hop").value);
    const look = $("lookahead");
    if (!look.disabled && look.value !== "" && Number(look.value) !== st.model.pre_lookahead_len) {
      start.pre_lookahead_len = Number(look.value);
    }
    st.request = start;
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    const url = proto + location.host + "/v1/stream" + (key() ? "?token=" + encodeURIComponent(key()) : "");
    setPhase("connecting");
    run.t0 = performance.now();
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    run.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify(start));
    ws.onmessage = (ev) => onMessage(ws, ev, rate, bufferS);
    ws.onclose = (ev) => {
      clearInterval(run.timer);
      if (run.ws !== ws) return;
      run.ws = null;
      if (st.phase === "streaming" || st.phase === "connecting") {
        if (st.done) setPhase("done");
        else {
          if (!st.error) showError("the stream closed before it was done (code " + ev.code + (ev.reason ? ": " +
            ev.reason : "") + ")");
          setPhase("error");
        }
      }
      draw();
    };
    requestAnimationFrame(animate);
  }

  function sendTokens(ws, rate) {
    if (ws.readyState !== WebSocket.OPEN || run.slowed) return;
    const t = performance.now() - run.t0;
    const sinceFirst = st.firstTokensAt == null ? 0 : (performance.now() - st.firstTokensAt) / 1000;
    let due = rate > 0 ? Math.max(1, Math.floor(sinceFirst * rate)) : st.tokensTotal;
    due = Math.min(due, st.tokensTotal);
    if (due > st.tokensSent) {
      const piece = run.tokens.slice(st.tokensSent, due);
      // the first-chunk clock starts when the tokens are handed to the socket (a busy send is latency too)
      if (st.firstTokensAt == null) st.firstTokensAt = performance.now();
      ws.send(JSON.stringify({ type: "tokens", tokens: piece }));
      st.tokensSent = due;
      st.sends.push({ t: t, n: piece.length, total: due });
    }
    if (st.tokensSent >= st.tokensTotal) {
      ws.send(JSON.stringify({ type: "end" }));
      clearInterval(run.timer);
      run.timer = null;
    }
  }

  function onMessage(ws, ev, rate, bufferS) {
    if (run.ws !== ws) return;
    if (typeof ev.data !== "string") {
      const h = run.header;
      run.header = null;
      if (!h) { showError("protocol error: audio without a chunk header"); return; }
      // the event's own time stamp: what every listener of this message sees, however busy the page is
      playChunk(h, new Int16Array(ev.data), ev.timeStamp);
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "started") {
      st.sampleRate = msg.sample_rate;
      st.session = msg.session;
      st.recommendedBufferMs = recommendedMs(msg);
      setPhase("streaming");
      sendTokens(ws, rate);
      if (run.timer == null && st.tokensSent < st.tokensTotal) run.timer = setInterval(() => sendTokens(ws, rate), 10);
      run.bufferS = bufferS;
    } else if (msg.type === "chunk") {
      run.header = msg;
      const rec = recommendedMs(msg);
      if (rec != null) {
        st.recommendedBufferMs = rec;
        // still buffering: the newest recommendation moves the start of playback (an explicit buffer stays)
        if (run.bufferS == null && run.nextTime != null && run.ctx.currentTime < run.playStart) {
          const ms = Math.max(rec, (run.ctx.currentTime + 0.02 - run.firstAt) * 1000); // never in the past
          reschedule(run.firstAt + ms / 1000, ms);
        }
      }
    } else if (msg.type === "slow_down") {
      run.slowed = true;
    } else if (msg.type === "resume") {
      run.slowed = false;
    } else if (msg.type === "done") {
      st.done = msg;
      st.doneAudioS = run.ctx ? run.ctx.currentTime : null;
      // all audio is here: a listener still buffering has nothing left to wait for, whatever the buffer asked
      // (a slow machine's recommendation covers a long stream; a short one would otherwise sit in silence)
      if (run.nextTime != null && run.ctx.currentTime + 0.02 < run.playStart) {
        const at = run.ctx.currentTime + 0.02;
        reschedule(at, (at - run.firstAt) * 1000);
        st.playedAtDone = true;
      }
      setPhase("done");
    } else if (msg.type === "error") {
      showError("server error " + msg.status + ": " + msg.message);
      setPhase("error");
    }
  }

  function playChunk(h, pcm, arrived) {
    const now = performance.now();
    const ctx = run.ctx;
    const sr = st.sampleRate;
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    run.pcm.push(f);
    if (st.firstChunkMs == null) st.firstChunkMs = arrived - st.firstTokensAt;
    const buffer = ctx.createBuffer(1, f.length, sr);
    buffer.copyToChannel(f, 0);
    const t = ctx.currentTime;
    let start;
    let gap = 0;
    if (run.nextTime == null) {
      // the start buffer: the field's value, else the server's newest recommendation, else DEFAULT_BUFFER_MS
      st.startBufferMs = run.bufferS != null ? run.bufferS * 1000 :
        st.recommendedBufferMs != null ? st.recommendedBufferMs : DEFAULT_BUFFER_MS;
      start = t + st.startBufferMs / 1000;
      run.firstAt = t;
      run.playStart = start;
      run.clockOffset = now / 1000 - t; // audio clock -> page clock
    } else if (run.nextTime < t + 0.003) {
      start = t + 0.02; // too late: the previous chunk already ended; this is an underrun (a stall)
      gap = start - run.nextTime;
      st.underruns += 1;
      st.underrunS += gap;
      st.worstStallS = Math.max(st.worstStallS, gap);
    } else {
      start = run.nextTime;
    }
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(ctx.destination);
    src.start(start);
    run.sources.push(src);
    const end = start + f.length / sr;
    run.nextTime = end;
    st.chunks.push({
      index: h.index, samples: h.samples, received: f.length, computeMs: h.compute_ms,
      arrivedMs: now - run.t0, start: start, end: end, gapS: gap,
    });
    st.computeMs += h.compute_ms;
    st.audioSeconds += f.length / sr;
    st.rtf = st.computeMs / 1000 / st.audioSeconds;
  }

  // playback has not started yet: move every chunk scheduled so far so that the first starts at newStart
  // (until then the chunks play back to back, so all move by the same amount)
  function reschedule(newStart, bufferMs) {
    const shift = newStart - run.playStart;
    st.startBufferMs = bufferMs;
    if (shift === 0) return;
    const old = run.sources;
    run.sources = [];
    old.forEach((s, i) => {
      try { s.stop(); } catch (e) { /* not started */ }
      const c = st.chunks[i];
      c.start += shift;
      c.end += shift;
      const src = run.ctx.createBufferSource();
      src.buffer = s.buffer;
      src.connect(run.ctx.destination);
      src.start(c.start);
      run.sources.push(src);
    });
    run.nextTime += shift;
    run.playStart = newStart;
  }

  function stopAudio() {
    for (const s of run.sources) {
      try { s.stop(); } catch (e) { /* not started yet */ }
    }
    run.sources = [];
  }

  function stop() {
    clearInterval(run.timer);
    run.timer = null;
    const ws = run.ws;
    run.ws = null;
    if (ws) ws.close(1000, "stopped");
    stopAudio();
    setPhase("stopped");
  }

  // ---------------------------------------------------------------- timeline
  function playbackSeconds() {
    // position on the page clock (seconds since Speak) of what is being heard now
    if (!run.ctx || run.nextTime == null) return null;
    return run.ctx.currentTime + run.clockOffset - run.t0 / 1000;
  }

  function updateStats() {
    $("stat-first").textContent = fmtMs(st.firstChunkMs);
    $("stat-tokens").textContent = st.tokensTotal ? st.tokensSent + " / " + st.tokensTotal : "\u2013";
    $("stat-chunks").textContent = st.chunks.length ? String(st.chunks.length) : "\u2013";
    $("stat-audio").textContent = st.audioSeconds ? st.audioSeconds.toFixed(2) + " s" : "\u2013";
    $("stat-underruns").textContent = st.tokensTotal ? st.underruns + (st.underruns ? " (total " +
      Math.round(st.underrunS * 1000) + " ms, worst " + Math.round(st.worstStallS * 1000) + " ms)" : "") : "\u2013";
    $("stat-buffer").textContent = !st.tokensTotal ? "\u2013" : (st.startBufferMs == null ? "\u2013" :
      fmtMs(st.startBufferMs)) + " / " + (st.recommendedBufferMs == null ? "none" : fmtMs(st.recommendedBufferMs));
    $("stat-rtf").textContent = st.rtf == null ? "\u2013" : st.rtf.toFixed(3);
  }

  function draw() {
    updateStats();
    const cv = $("timeline");
    const g = cv.getContext("2d");
    const W = cv.width;
    const H = cv.height;
    const L = 112;
    g.clearRect(0, 0, W, H);
    g.font = "12px system-ui, sans-serif";
    const pos = playbackSeconds();
    const toPage = (a) => a + run.clockOffset - run.t0 / 1000; // audio clock -> seconds since Speak
    let span = 2;
    for (const s of st.sends) span = Math.max(span, s.t / 1000);
    for (const c of st.chunks) span = Math.max(span, c.arrivedMs / 1000, toPage(c.end));
    span = Math.ceil(span * 1.05 * 2) / 2;
    const x = (sec) => L + (W - L - 10) * (sec / span);
    const rows = [["tokens sent", 20, 60], ["chunks received", 100, 50], ["playback", 175, 50]];
    g.fillStyle = "#5d6b78";
    for (const [name, y, h] of rows) {
      g.fillText(name, 6, y + h / 2 + 4);
      g.strokeStyle = "#e4e8ec";
      g.strokeRect(L, y, W - L - 10, h);
    }
    // seconds grid
    g.fillStyle = "#8a96a3";
    const step = span > 12 ? 2 : span > 5 ? 1 : 0.5;
    for (let s = 0; s <= span + 1e-9; s += step) {
      g.fillText(s.toFixed(step < 1 ? 1 : 0) + " s", x(s) - 8, H - 8);
      g.strokeStyle = "#f0f2f4";
      g.beginPath(); g.moveTo(x(s), 14); g.lineTo(x(s), H - 22); g.stroke();
    }
    // tokens sent: cumulative step line
    if (st.sends.length && st.tokensTotal) {
      const [, y, h] = rows[0];
      g.strokeStyle = "#2166c1";
      g.lineWidth = 2;
      g.beginPath();
      g.moveTo(x(0), y + h);
      let prev = 0;
      for (const s of st.sends) {
        g.lineTo(x(s.t / 1000), y + h - (h * prev) / st.tokensTotal);
        g.lineTo(x(s.t / 1000), y + h - (h * s.total) / st.tokensTotal);
        prev = s.total;
      }
      g.stroke();
      g.lineWidth = 1;
    }
    // chunks received: bar = server compute time, ending at arrival
    {
      const [, y, h] = rows[1];
      st.chunks.forEach((c, i) => {
        const a = c.arrivedMs / 1000;
        g.fillStyle = i % 2 ? "#7aa7dd" : "#2166c1";
        g.fillRect(x(Math.max(0, a - c.computeMs / 1000)), y + 8, Math.max(2, x(a) - x(a - c.computeMs / 1000)), h - 16);
        g.fillStyle = "#1d232a";
        g.fillRect(x(a) - 1, y + 2, 2, h - 4);
      });
      if (st.firstChunkMs != null && st.chunks.length) {
        g.fillStyle = "#1d232a";
        g.fillText("first chunk " + Math.round(st.firstChunkMs) + " ms", x(st.chunks[0].arrivedMs / 1000) + 4, y - 4);
      }
    }
    // playback: chunks as scheduled; underruns in red; playback position
    {
      const [, y, h] = rows[2];
      st.chunks.forEach((c, i) => {
        g.fillStyle = i % 2 ? "#58b48a" : "#2e8b61";
        g.fillRect(x(toPage(c.start)), y + 8, Math.max(1, x(toPage(c.end)) - x(toPage(c.start))), h - 16);
        if (c.gapS > 0) {
          g.fillStyle = "#c0392b";
          g.fillRect(x(toPage(c.start - c.gapS)), y + 2, Math.max(3, x(toPage(c.start)) - x(toPage(c.start - c.gapS))), h - 4);
        }
      });
      if (pos != null) {
        g.strokeStyle = "#c0392b";
        g.lineWidth = 2;
        g.beginPath(); g.moveTo(x(Math.min(pos, span)), y - 4); g.lineTo(x(Math.min(pos, span)), y + h + 4); g.stroke();
        g.lineWidth = 1;
      }
    }
  }

  function animate() {
    draw();
    const last = st.chunks.length ? st.chunks[st.chunks.length - 1] : null;
    const playing = last && run.ctx && run.ctx.currentTime < last.end + 0.05;
    if (st.phase === "connecting" || st.phase === "streaming" || playing) requestAnimationFrame(animate);
    else window.t2w.playedOut = true;
  }

  // ---------------------------------------------------------------- wiring
  window.t2w.speak = speak;
  window.t2w.audioTime = () => (run.ctx ? run.ctx.currentTime : null);
  window.t2w.parseTokens = parseTokens;
  document.addEventListener("DOMContentLoaded", () => {
    $("speak").addEventListener("click", speak);
    $("stop").addEventListener("click", stop);
    $("download").addEventListener("click", download);
    $("voice-upload").addEventListener("click", () => {
      const f = $("voice-file").files[0];
      if (!f) { showError("choose a recording to upload first"); return; }
      uploadVoice(f, f.name);
    });
    $("rec").addEventListener("click", toggleRecord);
    $("voice").addEventListener("change", voiceChanged);
    $("hop").addEventListener("input", () => { $("hop").dataset.user = "1"; });
    $("tokenize").addEventListener("click", tokenizeRecording);
    $("tokens").addEventListener("input", () => {
      document.querySelector("input[name=source][value=tokens]").checked = true;
    });
    init();
  });
})();
