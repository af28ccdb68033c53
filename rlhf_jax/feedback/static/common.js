"use strict";
// Shared by every page: the token (kept in this tab's sessionStorage), API calls, safe text rendering.
const Feedback = (() => {
  const KEY = "rlhf_jax_feedback_token";
  const token = () => sessionStorage.getItem(KEY);
  const setToken = (t) => sessionStorage.setItem(KEY, t);
  const signOut = () => { sessionStorage.removeItem(KEY); location.href = "/"; };

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function api(method, path, body, explicitToken) {
    const headers = { "Authorization": "Bearer " + (explicitToken || token() || "") };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "the server cannot be reached (" + e.message + ")");
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    if (!response.ok) {
      const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : text;
      throw new ApiError(response.status, detail || response.statusText);
    }
    return data;
  }

  // Model text and prompts only ever enter the page through textContent.
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function renderPrompt(container, prompt) {
    container.replaceChildren();
    if (typeof prompt === "string") { container.textContent = prompt; return; }
    for (const message of prompt) {
      const turn = el("div", null, "turn");
      turn.append(el("span", message.role + ": ", "turn-role"), el("span", message.content));
      container.append(turn);
    }
  }

  function requireToken() {
    if (!token()) { location.href = "/"; return false; }
    return true;
  }

  function showError(e) {
    const box = document.getElementById("error");
    if (e && e.status === 401) { signOut(); return; }
    box.textContent = e ? (e.status ? e.status + ": " : "") + e.message : "";
  }

  return { token, setToken, signOut, api, el, renderPrompt, requireToken, showError, ApiError };
})();
