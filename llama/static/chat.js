// The chat page: a conversation with the server's /v1/chat/completions, each answer streamed as it is written.
// The conversation lives here (the server keeps none): every message sends the whole of it, after the system prompt.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} of every finished turn
let controller = null;  // aborts the answer being written
let chat = 0;  // counts "New chat"s: an answer stopped by one stays out of the new conversation

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function showStatus(text) {
  $("status").textContent = text;
}

// A message's box: role label and content, added to the conversation's view; returns its content element.
function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message";
  box.dataset.role = role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.append(label, content);
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
  return content;
}

function addNote(content, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  content.after(note);
  note.scrollIntoView({ block: "end" });
}

// Server-sent events from a fetch body: calls onData with each event's data until the stream ends.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation,
                    { role: "user", content: text }];
  const body = { messages, stream: true };  // fields left empty: the server's defaults
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;

  showStatus("");
  const userBox = addMessage("user", text).parentElement;
  const content = addMessage("assistant", "");
  const box = content.parentElement;
  box.dataset.state = "streaming";
  const thisChat = chat;
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) return;
      if (choice.delta.content) {
        answer += choice.delta.content;
        content.textContent = answer;
        box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    box.dataset.state = "done";
    if (finish === "length") addNote(content, "[cut short: the token limit was reached]");
  } catch (err) {
    if (err.name === "AbortError") {
      box.dataset.state = "stopped";
      addNote(content, "[stopped]");
    } else if (answer) {  // cut off mid-answer (the server stopping): what came stays
      box.dataset.state = "error";
      addNote(content, `[${err.message}]`);
    } else {  // refused: take the message back, so it can be changed and sent again
      box.remove();
      userBox.remove();
      $("input").value = text;
      showStatus(err.message);
      return;
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  // The answer joins the conversation as far as it got (a stopped one too).
  if (thisChat === chat) conversation.push({ role: "user", content: text }, { role: "assistant", content: answer });
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.ok) {
      $("model").textContent = (await response.json()).data[0].id;
      showStatus("");
    } else if (response.status === 401) {
      $("settings").open = true;
      showStatus("This server needs an API key: enter it in the settings.");
    }
  } catch {
    showStatus("The server cannot be reached.");
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  chat += 1;
  if (controller) controller.abort();
  conversation.length = 0;
  $("conversation").replaceChildren();
  showStatus("");
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("llama-api-key", $("api-key").value.trim());
  showModel();
});
$("api-key").value = sessionStorage.getItem("llama-api-key") || "";
showModel();
