// The chat page: talks to this server's own API (POST /generate, GET /task/{id}/events,
// GET /task/{id}, DELETE /task/{id}), with no library and nothing fetched from elsewhere.
//
// Model output is only ever put into the page as text (textContent), never as HTML.
// The conversation, the running task's id and its last cursor live in localStorage, so a reload
// (or a dropped connection) goes on with the same answer from where it was.
"use strict";

(() => {
  const STORE = {
    apiKey: "chat.apiKey",
    conversation: "chat.conversation",
    running: "chat.running",
    settings: "chat.settings",
  };
  const START_CURSOR = "0-0";
  const TASK_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 8000;
  const ENDED = ["succeeded", "failed", "cancelled"]; // a task's final statuses
  const FIELD_NAMES = {
    prompt: "The message",
    messages: "The conversation",
    system_prompt: "The system prompt",
    max_new_tokens: "Max tokens",
    temperature: "Temperature",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    serverState: $("server-state"),
    newChat: $("new-chat"),
    keyPanel: $("key-panel"),
    apiKey: $("api-key"),
    saveKey: $("save-key"),
    keyState: $("key-state"),
    systemPrompt: $("system-prompt"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    conversation: $("conversation"),
    empty: $("empty"),
    notice: $("notice"),
    composer: $("composer"),
    message: $("message"),
    send: $("send"),
    stop: $("stop"),
    template: $("turn-template"),
  };

  // turns: {role, content, task_id?, status?, view?, note?}; running: {task_id, cursor} while an answer runs.
  const state = { turns: [], running: null, needsKey: false, controller: null, waitingForKey: false };

  // ---- storage -------------------------------------------------------------------------------

  function load(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (_) {
      return fallback;
    }
  }

  function store(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(key);
      else localStorage.setItem(key, JSON.stringify(value));
    } catch (_) {
      // Storage full or disabled: the page still works, a reload just forgets.
    }
  }

  function saveConversation() {
    store(STORE.conversation, state.turns.map((turn) => {
      const { element, ...kept } = turn;
      return kept;
    }));
    store(STORE.running, state.running);
  }

  function apiKey() {
    return load(STORE.apiKey, "") || "";
  }

  // ---- the API -------------------------------------------------------------------------------

  class Unreachable extends Error {}

  async function api(method, path, body, signal) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    try {
      return await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new Unreachable("Cannot reach the server. Check that it is running and try again.");
    }
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (body && body.detail !== undefined) return body.detail;
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // not JSON
    }
    return null;
  }

  function capitalized(text) {
    return text ? text[0].toUpperCase() + text.slice(1) : text;
  }

  function fieldName(loc) {
    const path = (loc || []).filter((part) => part !== "body");
    if (path[0] === "messages" && typeof path[1] === "number") return `Message ${path[1] + 1}`;
    return FIELD_NAMES[path[0]] || (path.length ? String(path.join(".")) : "The request");
  }

  // What a refusal means, in words a person can act on.
  async function describeFailure(response) {
    const detail = await detailOf(response);
    const text = typeof detail === "string" ? detail : "";
    switch (response.status) {
      case 401:
        askForKey();
        return apiKey()
          ? "The server did not accept the API key. Enter a valid key above."
          : "This server needs an API key. Enter it above, then send again.";
      case 404:
        return "This answer is no longer on the server (it expired, or belongs to another API key).";
      case 413:
        return `The message is too large for this server: ${text}`;
      case 422: {
        if (Array.isArray(detail) && detail.length) {
          return detail.map((e) => `${fieldName(e.loc)}: ${e.msg}`).join(" ");
        }
        return `The server refused the request: ${text}`;
      }
      case 429: {
        const waiting = /\((\d+) tasks? waiting/.exec(text);
        const seconds = parseInt(response.headers.get("Retry-After") || "", 10);
        const count = waiting ? Number(waiting[1]) : null;
        const who = count === null ? "too many tasks are waiting"
          : `${count} ${count === 1 ? "task is" : "tasks are"} waiting`;
        const when = seconds > 0 ? `${seconds} ${seconds === 1 ? "second" : "seconds"}` : "a few seconds";
        return `The server is busy: ${who}. Try again in ${when}.`;
      }
      case 503:
        return `The server cannot take requests right now: ${text || "it is unavailable"}.`;
      default:
        return `The server answered ${response.status}${text ? `: ${text}` : ""}.`;
    }
  }

  // ---- Server-Sent Events over fetch (EventSource cannot send an Authorization header) -------

  async function* readEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = { type: "", id: null, data: [] };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return; // an event cut off before its blank line is dropped, as EventSource does
        buffer += decoder.decode(value, { stream: true });
        for (;;) {
          const end = buffer.search(/[\r\n]/);
          if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break; // maybe \r\n, split
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + (buffer[end] === "\r" && buffer[end + 1] === "\n" ? 2 : 1));
          if (line === "") {
            if (event.data.length) yield { type: event.type || "message", id: event.id, data: event.data.join("\n") };
            event = { type: "", id: null, data: [] };
            continue;
          }
          if (line[0] === ":") continue; // a comment: `: ping`
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value[0] === " ") value = value.slice(1);
          if (field === "event") event.type = value;
          else if (field === "data") event.data.push(value);
          else if (field === "id") event.id = value;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ---- rendering -----------------------------------------------------------------------------

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  function scrollDown(wasNearBottom) {
    if (wasNearBottom) window.scrollTo(0, document.body.scrollHeight);
  }

  function addTurn(turn) {
    const element = ui.template.content.firstElementChild.cloneNode(true);
    element.classList.add(turn.role);
    element.dataset.role = turn.role;
    element.querySelector(".who").textContent = turn.role === "user" ? "You" : "Assistant";
    turn.element = element;
    state.turns.push(turn);
    const follow = nearBottom();
    ui.conversation.append(element);
    ui.empty.hidden = true;
    renderTurn(turn);
    scrollDown(follow);
    return turn;
  }

  function removeTurn(turn) {
    turn.element.remove();
    state.turns = state.turns.filter((t) => t !== turn);
    ui.empty.hidden = state.turns.length > 0;
  }

  function renderTurn(turn) {
    const element = turn.element;
    if (turn.task_id) element.dataset.taskId = turn.task_id;
    element.dataset.status = turn.status || "";
    element.classList.toggle("streaming", turn.status === "queued" || turn.status === "running");
    element.classList.toggle("failed", turn.status === "failed" || turn.status === "lost");
    element.classList.toggle("stopped", turn.status === "cancelled");
    element.querySelector(".text").textContent = turn.content; // text, never HTML
    element.querySelector(".state").textContent = turn.note || "";
    renderStats(element.querySelector(".stats"), turn.view);
  }

  function renderStats(box, view) {
    box.replaceChildren();
    if (!view) return;
    const add = (name, strong, rest, before = "") => {
      const span = document.createElement("span");
      span.dataset.stat = name;
      const b = document.createElement("b");
      b.textContent = strong;
      span.append(before, b, rest);
      box.append(span);
    };
    const { usage, timings, memory } = view;
    if (usage) add("tokens", usage.completion_tokens.toLocaleString("en-US"), " tokens");
    if (timings) {
      add("speed", timings.tokens_per_second.toFixed(1), " tok/s");
      if (timings.time_to_first_token_s !== null && timings.time_to_first_token_s !== undefined) {
        add("first-token", seconds(timings.time_to_first_token_s), " to first token");
      }
      add("queued", seconds(timings.queued_s), " queued");
    }
    if (memory) {
      const weights = megabytes(memory.model_weight_bytes);
      add("memory", megabytes(memory.peak_bytes), ` peak, weights ${weights} (${memory.device})`);
    }
    if (view.worker) add("worker", view.worker, view.attempt > 1 ? ` (attempt ${view.attempt})` : "", "answered by ");
  }

  function seconds(s) {
    return `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s`;
  }

  function megabytes(bytes) {
    return `${Math.round(bytes / 1e6).toLocaleString("en-US")} MB`;
  }

  function ordinal(n) {
    const tens = n % 100;
    const suffix = tens >= 11 && tens <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" })[n % 10] || "th";
    return `${n}${suffix}`;
  }

  // "3rd in line, about 20 s" when the server says where the task stands; a plain line otherwise.
  function queueNote(position, estimate) {
    if (typeof position !== "number") return "Waiting in the queue…";
    let note = position === 0 ? "Next in line" : `${ordinal(position + 1)} in line`;
    if (typeof estimate === "number" && isFinite(estimate)) {
      note += estimate < 60
        ? `, about ${Math.max(1, Math.round(estimate))} s`
        : `, about ${Math.round(estimate / 60)} min`;
    }
    return note;
  }

  function showNotice(text, kind) {
    ui.notice.textContent = text;
    ui.notice.className = `notice${kind ? ` ${kind}` : ""}`;
    ui.notice.hidden = false;
  }

  function clearNotice() {
    ui.notice.hidden = true;
    ui.notice.textContent = "";
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    ui.stop.disabled = false;
  }

  // ---- the API key ---------------------------------------------------------------------------

  function askForKey() {
    state.needsKey = true;
    ui.keyPanel.hidden = false;
    if (!ui.apiKey.value) ui.apiKey.focus();
  }

  function setKeyState(text, bad) {
    ui.keyState.textContent = text;
    ui.keyState.classList.toggle("bad", Boolean(bad));
  }

  // An authenticated route asked without a key: 401 means the server needs one.
  async function probeKey() {
    let open;
    try {
      open = await fetch("/v1/models", { cache: "no-store" });
    } catch (_) {
      setServerState("Cannot reach the server", true);
      return;
    }
    if (open.status === 401) {
      askForKey();
      ui.apiKey.value = apiKey();
      if (!apiKey()) {
        setKeyState("This server needs an API key.", true);
        return;
      }
      await checkKey();
    } else if (open.ok) {
      state.needsKey = false;
      ui.keyPanel.hidden = true;
      showModel(open);
    }
  }

  async function checkKey() {
    try {
      const response = await api("GET", "/v1/models");
      if (response.ok) {
        setKeyState("Key accepted. It is kept in this browser only.");
        showModel(response);
        return true;
      }
      const refused = response.status === 401;
      setKeyState(refused ? "The server did not accept this key." : `The server answered ${response.status}.`, true);
    } catch (err) {
      setKeyState(err.message, true);
    }
    return false;
  }

  async function showModel(response) {
    try {
      const body = await response.json();
      if (body.data && body.data.length) ui.model.textContent = body.data[0].id;
    } catch (_) {
      // no model name: the title stays plain
    }
  }

  async function saveKey() {
    store(STORE.apiKey, ui.apiKey.value.trim() || null);
    const accepted = await checkKey();
    if (accepted) {
      clearNotice();
      if (state.waitingForKey) {
        state.waitingForKey = false;
        reattach();
      }
    }
  }

  function setServerState(text, bad) {
    ui.serverState.textContent = text;
    ui.serverState.classList.toggle("down", Boolean(bad));
  }

  async function checkHealth() {
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const report = await response.json();
      if (report.ok) setServerState("Ready");
      else if (!report.redis.ok) setServerState("The task queue is down", true);
      else setServerState("No worker is up: answers wait in the queue", true);
    } catch (_) {
      setServerState("Cannot reach the server", true);
    }
  }

  // ---- sending, following, stopping ----------------------------------------------------------

  function settings() {
    const body = {};
    const system = ui.systemPrompt.value;
    if (system.trim()) body.system_prompt = system;
    const temperature = parseFloat(ui.temperature.value);
    if (isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (isFinite(maxTokens)) body.max_new_tokens = maxTokens;
    return body;
  }

  function saveSettings() {
    store(STORE.settings, {
      system_prompt: ui.systemPrompt.value,
      temperature: ui.temperature.value,
      max_new_tokens: ui.maxTokens.value,
    });
  }

  // The conversation as the API takes it: each question with its answer, leaving out questions
  // whose answer has no text (it failed or was stopped at once), so that turns alternate.
  function history() {
    const messages = [];
    for (let i = 0; i + 1 < state.turns.length; i++) {
      const question = state.turns[i];
      const answer = state.turns[i + 1];
      if (question.role === "user" && answer.role === "assistant" && answer.content.trim()) {
        messages.push({ role: "user", content: question.content }, { role: "assistant", content: answer.content });
        i++;
      }
    }
    return messages;
  }

  async function send(text) {
    clearNotice();
    const body = { messages: [...history(), { role: "user", content: text }], ...settings() };
    const question = addTurn({ role: "user", content: text });
    ui.message.value = "";
    setBusy(true);
    let response;
    try {
      response = await api("POST", "/generate", body);
    } catch (err) {
      return refused(question, text, err.message);
    }
    if (response.status !== 202) return refused(question, text, await describeFailure(response));
    const accepted = await response.json();
    const answer = addTurn({
      role: "assistant", content: "", task_id: accepted.task_id, status: "queued", note: queueNote(),
    });
    state.running = { task_id: accepted.task_id, cursor: START_CURSOR };
    saveConversation();
    follow(answer, state.running);
  }

  // Nothing was queued: the question goes back into the box, with the reason.
  function refused(question, text, reason) {
    removeTurn(question);
    if (!ui.message.value) ui.message.value = text;
    showNotice(reason, "warn");
    setBusy(false);
  }

  function answerOf(taskId) {
    return state.turns.find((turn) => turn.role === "assistant" && turn.task_id === taskId);
  }

  // Follow the task's events from the run's cursor until its result, reconnecting after a drop.
  async function follow(answer, run) {
    const controller = new AbortController();
    state.controller = controller;
    let delay = RETRY_FIRST_MS;
    const retry = async (note) => {
      answer.note = note;
      renderTurn(answer);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, RETRY_MAX_MS);
    };
    while (state.running === run && !controller.signal.aborted) {
      let response;
      try {
        const path = `/task/${run.task_id}/events?after=${encodeURIComponent(run.cursor)}`;
        response = await api("GET", path, undefined, controller.signal);
      } catch (err) {
        if (controller.signal.aborted) return;
        await retry("Connection lost: reconnecting…");
        continue;
      }
      if (!response.ok) {
        if (response.status >= 500 || response.status === 429) {
          await retry(`The server answered ${response.status}: retrying…`);
          continue;
        }
        const reason = await describeFailure(response);
        if (response.status === 401) return waitForKey(answer, reason);
        return end(answer, "lost", reason);
      }
      try {
        for await (const event of readEvents(response.body)) {
          if (state.running !== run) return;
          delay = RETRY_FIRST_MS;
          let data;
          try {
            data = JSON.parse(event.data);
          } catch (_) {
            continue; // not one of this API's events
          }
          if (event.type === "chunk") {
            onChunk(answer, run, event.id, data);
          } else if (event.type === "queued") {
            answer.note = queueNote(data.queue_position, data.estimated_start_s);
            renderTurn(answer);
          } else if (event.type === "result") {
            return finish(answer, data);
          } else if (event.type === "error") {
            return end(answer, "lost", data.detail || "The answer is no longer on the server.");
          }
        }
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      if (state.running === run) await retry("Connection lost: reconnecting…");
    }
  }

  function onChunk(answer, run, cursor, chunk) {
    const follow = nearBottom();
    answer.content += chunk.text;
    answer.status = "running";
    answer.note = chunk.attempt > 1 ? `Taken over by another worker (attempt ${chunk.attempt})` : "";
    if (cursor) run.cursor = cursor;
    renderTurn(answer);
    saveConversation();
    scrollDown(follow);
  }

  const FINISH_NOTES = {
    length: "Reached the max tokens limit.",
    timeout: "Stopped: the answer ran past the server's time limit.",
  };

  function finish(answer, view) {
    const follow = nearBottom();
    if (typeof view.text === "string") answer.content = view.text;
    answer.status = view.status;
    answer.view = {
      usage: view.usage, timings: view.timings, memory: view.memory, worker: view.worker,
      model: view.model, attempt: view.attempt, finish_reason: view.finish_reason,
    };
    if (view.status === "failed") answer.note = `The answer failed: ${view.error || "the server gave no reason"}`;
    else if (view.status === "cancelled") answer.note = answer.content ? "Stopped." : "Stopped before it started.";
    else answer.note = FINISH_NOTES[view.finish_reason] || "";
    done(answer);
    scrollDown(follow);
  }

  function end(answer, status, note) {
    answer.status = status;
    answer.note = note;
    done(answer);
  }

  function done(answer) {
    if (state.running && state.running.task_id === answer.task_id) state.running = null;
    renderTurn(answer);
    saveConversation();
    setBusy(false);
  }

  function waitForKey(answer, reason) {
    state.waitingForKey = true;
    answer.note = "Waiting for an API key…";
    renderTurn(answer);
    showNotice(reason, "warn");
  }

  async function stop() {
    const run = state.running;
    if (!run) return;
    ui.stop.disabled = true;
    const answer = answerOf(run.task_id);
    let response;
    try {
      response = await api("DELETE", `/task/${run.task_id}`);
    } catch (err) {
      ui.stop.disabled = false;
      return showNotice(err.message, "warn");
    }
    if (response.status === 202 || response.status === 409) {
      // The stream brings the result: the text so far, ended `cancelled` (or finished meanwhile).
      // It may have come before this answer did: then the answer already says how it ended.
      const ended = answer && ENDED.includes(answer.status);
      if (answer && response.status === 202 && !ended) {
        answer.note = "Stopping…";
        renderTurn(answer);
      }
      return;
    }
    const reason = await describeFailure(response);
    ui.stop.disabled = false;
    if (response.status === 404 && answer) return end(answer, "lost", reason);
    showNotice(reason, "warn");
  }

  // After a reload: the text so far from GET /task/{id}, then its events from that cursor.
  async function reattach() {
    const saved = state.running;
    if (!saved || !TASK_ID.test(saved.task_id)) {
      state.running = null;
      return;
    }
    let answer = answerOf(saved.task_id);
    if (!answer) answer = addTurn({ role: "assistant", content: "", task_id: saved.task_id, status: "running" });
    setBusy(true);
    let delay = RETRY_FIRST_MS;
    for (;;) {
      let response;
      try {
        response = await api("GET", `/task/${saved.task_id}`);
      } catch (err) {
        answer.note = "Cannot reach the server: retrying…";
        renderTurn(answer);
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, RETRY_MAX_MS);
        continue;
      }
      if (!response.ok) {
        const reason = await describeFailure(response);
        if (response.status === 401) return waitForKey(answer, reason);
        return end(answer, "lost", reason);
      }
      const view = await response.json();
      answer.content = view.text || "";
      if (ENDED.includes(view.status)) return finish(answer, view);
      const run = { task_id: saved.task_id, cursor: view.cursor || START_CURSOR };
      state.running = run;
      answer.status = view.status;
      answer.note = view.status === "queued" ? queueNote(view.queue_position, view.estimated_start_s) : "";
      renderTurn(answer);
      saveConversation();
      return follow(answer, run);
    }
  }

  function newChat() {
    const run = state.running;
    if (run) api("DELETE", `/task/${run.task_id}`).catch(() => {}); // frees the model for others
    state.running = null;
    if (state.controller) state.controller.abort();
    state.waitingForKey = false;
    for (const turn of state.turns) turn.element.remove();
    state.turns = [];
    ui.empty.hidden = false;
    clearNotice();
    setBusy(false);
    saveConversation();
    ui.message.focus();
  }

  // ---- start ---------------------------------------------------------------------------------

  function restore() {
    const saved = load(STORE.settings, null);
    if (saved) {
      ui.systemPrompt.value = saved.system_prompt || "";
      if (saved.temperature !== undefined) ui.temperature.value = saved.temperature;
      if (saved.max_new_tokens !== undefined) ui.maxTokens.value = saved.max_new_tokens;
    }
    const turns = load(STORE.conversation, []);
    for (const turn of Array.isArray(turns) ? turns : []) {
      if (turn && (turn.role === "user" || turn.role === "assistant") && typeof turn.content === "string") {
        addTurn(turn);
      }
    }
    const running = load(STORE.running, null);
    state.running = running && typeof running.task_id === "string"
      ? { task_id: running.task_id, cursor: running.cursor || START_CURSOR } : null;
    for (const turn of state.turns) {
      const unfinished = turn.status === "queued" || turn.status === "running";
      if (unfinished && !(state.running && state.running.task_id === turn.task_id)) {
        turn.status = "lost";
        turn.note = "Interrupted.";
        renderTurn(turn);
      }
    }
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.message.value;
    if (!text.trim() || state.running || ui.send.disabled) return; // Enter submits even past a disabled button
    send(text);
  });
  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.saveKey.addEventListener("click", saveKey);
  ui.apiKey.addEventListener("keydown", (event) => {
    if (event.key === "Enter") saveKey();
  });
  for (const input of [ui.systemPrompt, ui.temperature, ui.maxTokens]) input.addEventListener("input", saveSettings);

  restore();
  checkHealth();
  probeKey().then(reattach);
})();
