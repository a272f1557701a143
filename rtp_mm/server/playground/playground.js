// rtp-mm playground: a chat page over the server's own OpenAI route, with images uploaded as multipart parts.
// Plain ES2020, no build step, no third-party code, and only same-origin requests (the page's CSP allows no other).
// The API key, when the server asks for one, lives in this script's memory only: never in storage or cookies.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    apiKey: null,
    model: null, // the first entry of /v1/models
    vision: false,
    history: [], // {role, text, files}
    pending: [], // Files attached to the next message
    controller: null, // AbortController of the running request
  };

  // ---- HTTP ---------------------------------------------------------------------------------------------------
  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
    const resp = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    if (resp.status === 401) askForKey();
    return resp;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      const error = body.error || body;
      return `${resp.status} (${error.code || error.error_code || "error"}): ${error.message || JSON.stringify(body)}`;
    } catch {
      return `${resp.status} ${resp.statusText}`;
    }
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function askForKey() {
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  // ---- model and status -----------------------------------------------------------------------------------------
  async function loadModel() {
    const resp = await api("/v1/models");
    if (!resp.ok) {
      showError(await errorText(resp));
      return;
    }
    const { data } = await resp.json();
    state.model = data[0];
    state.vision = Boolean(state.model.vision);
    $("model").textContent = `${state.model.id} · ${state.model.model_type} · up to ${state.model.max_model_len} tokens`;
    const adapters = data.slice(1); // LoRA adapters are listed as further models
    $("adapter-row").hidden = adapters.length === 0;
    $("adapter").replaceChildren(
      ...[state.model, ...adapters].map((m, i) => new Option(i ? m.id : `${m.id} (base)`, m.id)),
    );
    $("attach").disabled = !state.vision;
    $("file").disabled = !state.vision;
    $("image-note").hidden = state.vision;
    $("image-note").textContent = state.vision
      ? ""
      : `Images are disabled: MODEL_TYPE=${state.model.model_type} is a text-only model (it has no vision encoder).`;
    clearError();
    pollStatus();
  }

  async function pollStatus() {
    const status = $("status");
    try {
      const resp = await api("/worker_status");
      if (!resp.ok) throw new Error(String(resp.status));
      const s = await resp.json();
      status.textContent = `alive · ${s.available_concurrency} free slots · KV ${s.available_kv_cache}/${s.total_kv_cache} tokens free`;
      status.dataset.ok = "true";
      status.dataset.free = String(s.available_concurrency);
    } catch (e) {
      status.textContent = `server unreachable (${e.message})`;
      status.dataset.ok = "false";
    }
  }

  // ---- images ---------------------------------------------------------------------------------------------------
  function addFiles(files) {
    if (!state.vision) return;
    for (const file of files) if (file.type.startsWith("image/")) state.pending.push(file);
    renderThumbs();
  }

  function thumbnail(file) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    img.title = `${file.name} (${Math.ceil(file.size / 1024)} KiB)`;
    return img;
  }

  function renderThumbs() {
    $("thumbs").replaceChildren(
      ...state.pending.map((file, i) => {
        const figure = document.createElement("figure");
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "×";
        remove.title = "remove";
        remove.addEventListener("click", () => {
          state.pending.splice(i, 1);
          renderThumbs();
        });
        figure.append(thumbnail(file), remove);
        return figure;
      }),
    );
  }

  // ---- chat -----------------------------------------------------------------------------------------------------
  function addMessage(role, text, files) {
    const message = document.createElement("div");
    message.className = `message ${role}`;
    message.dataset.state = role === "assistant" ? "streaming" : "done";
    if (files.length) {
      const images = document.createElement("div");
      images.className = "images";
      images.append(...files.map(thumbnail));
      message.append(images);
    }
    const body = document.createElement("p");
    body.textContent = text;
    message.append(body);
    $("chat").append(message);
    message.scrollIntoView({ block: "end" });
    return message;
  }

  function numberOf(id) {
    const value = $(id).value.trim();
    return value === "" ? null : Number(value);
  }

  // The OpenAI chat body, as multipart: a "request" part with the JSON, one part per image, referenced upload://.
  function buildForm() {
    const form = new FormData();
    const files = [];
    const messages = state.history.map((m) => {
      if (m.role === "assistant" || m.files.length === 0) return { role: m.role, content: m.text };
      const parts = m.files.map((file) => {
        files.push(file);
        return { type: "image_url", image_url: { url: `upload://image${files.length - 1}` } };
      });
      if (m.text) parts.push({ type: "text", text: m.text });
      return { role: m.role, content: parts };
    });
    const extra = $("extra").value.trim() ? JSON.parse($("extra").value) : {};
    if (numberOf("top-k")) extra.top_k = numberOf("top-k");
    const body = {
      model: $("adapter").value || state.model.id,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: numberOf("max-tokens"),
      temperature: numberOf("temperature"),
      top_p: numberOf("top-p"),
    };
    if (numberOf("seed") !== null) body.seed = numberOf("seed");
    if (Object.keys(extra).length) body.extra_configs = extra;
    form.append("request", new Blob([JSON.stringify(body)], { type: "application/json" }));
    files.forEach((file, i) => form.append(`image${i}`, file, file.name));
    return form;
  }

  // Server-sent events of /v1/chat/completions: "data: {chunk}\n\n" ... "data: [DONE]\n\n".
  async function readStream(resp, onDelta) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
          for (const choice of chunk.choices || []) onDelta(choice);
        }
      }
    }
  }

  async function send(event) {
    event.preventDefault();
    if (state.controller || !state.model) return;
    const text = $("prompt").value.trim();
    if (!text && state.pending.length === 0) return;
    clearError();
    let form;
    const user = { role: "user", text, files: state.pending };
    state.history.push(user);
    try {
      form = buildForm();
    } catch (e) {
      state.history.pop();
      showError(`extra_configs is not valid JSON: ${e.message}`);
      return;
    }
    state.pending = [];
    renderThumbs();
    $("prompt").value = "";
    addMessage("user", text, user.files);
    const answer = addMessage("assistant", "", []);
    const output = answer.querySelector("p");
    state.controller = new AbortController();
    $("stop").disabled = false;
    $("send").disabled = true;
    let reply = "";
    try {
      const resp = await api("/v1/chat/completions", { method: "POST", body: form, signal: state.controller.signal });
      if (!resp.ok) throw new Error(await errorText(resp));
      await readStream(resp, (choice) => {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          output.textContent = reply;
        }
        if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
      });
      answer.dataset.state = "done";
      state.history.push({ role: "assistant", text: reply, files: [] });
    } catch (e) {
      state.history.pop(); // the turn failed: the next request should not carry it
      if (e.name === "AbortError") {
        answer.dataset.state = "stopped";
      } else {
        answer.dataset.state = "error";
        showError(e.message);
      }
    } finally {
      state.controller = null;
      $("stop").disabled = true;
      $("send").disabled = false;
      pollStatus();
    }
  }

  // ---- wiring ---------------------------------------------------------------------------------------------------
  function wire() {
    $("composer").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) send(e);
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("attach").addEventListener("click", () => $("file").click());
    $("file").addEventListener("change", () => {
      addFiles($("file").files);
      $("file").value = "";
    });
    const composer = $("composer");
    composer.addEventListener("dragover", (e) => {
      e.preventDefault();
      composer.classList.toggle("dropping", state.vision);
    });
    composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
    composer.addEventListener("drop", (e) => {
      e.preventDefault();
      composer.classList.remove("dropping");
      addFiles(e.dataTransfer.files);
    });
    $("clear").addEventListener("click", () => {
      state.history = [];
      $("chat").replaceChildren();
    });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.apiKey = $("api-key").value;
      $("api-key").value = "";
      $("key-form").hidden = true;
      loadModel();
    });
    loadModel();
    setInterval(pollStatus, 5000);
  }

  wire();
})();
