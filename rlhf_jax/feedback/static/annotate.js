"use strict";
// The annotation page: shows the annotator's current item, sends the answer, and moves on only
// after the server has committed it (201). Keyboard: see the hints on the buttons.
(() => {
  if (!Feedback.requireToken()) return;
  const $ = (id) => document.getElementById(id);
  let item = null;
  let busy = false;
  let typed = [];  // ranked: response numbers typed so far, best first

  function setBusy(value) {
    busy = value;
    for (const b of document.querySelectorAll("#task button")) b.disabled = value;
  }

  function showProgress(p) {
    if (p) $("progress").textContent = `answered ${p.answered} · left ${p.left}`;
  }

  async function load() {
    Feedback.showError(null);
    $("status").textContent = "loading…";
    try {
      const data = await Feedback.api("GET", "/api/next");
      showProgress(data.progress);
      render(data.item);
    } catch (e) {
      $("status").textContent = "";
      Feedback.showError(e);
    }
  }

  function render(next) {
    item = next;
    typed = [];
    $("status").textContent = "";
    $("done").hidden = item !== null;
    $("task").hidden = item === null;
    if (item === null) return;
    $("task").dataset.itemId = item.id;
    $("task").dataset.kind = item.kind;
    for (const kind of ["pairwise", "ranked", "thumbs"]) $(kind).hidden = kind !== item.kind;
    Feedback.renderPrompt($("prompt"), item.prompt);
    if (item.kind === "pairwise") {
      $("task-title").textContent = "Which response is better?";
      document.querySelector("#response-A .text").textContent = item.responses[0];
      document.querySelector("#response-B .text").textContent = item.responses[1];
    } else if (item.kind === "ranked") {
      $("task-title").textContent = `Rank the ${item.responses.length} responses`;
      renderRanking(item.responses.map((_, i) => i));
    } else {
      $("task-title").textContent = "Is this response good?";
      document.querySelector("#response-single .text").textContent = item.responses[0];
      $("comment").value = "";
    }
    setBusy(false);
  }

  // --- ranking ---------------------------------------------------------------------------------
  function currentOrder() { return [...$("ranking").children].map((li) => Number(li.dataset.index)); }

  function renderRanking(order) {
    const list = $("ranking");
    list.replaceChildren();
    for (const index of order) {
      const li = Feedback.el("li");
      li.dataset.index = index;
      li.draggable = true;
      li.append(Feedback.el("span", String(index + 1), "num"), Feedback.el("div", item.responses[index], "text"));
      const moves = Feedback.el("span", null, "moves");
      const up = Feedback.el("button", "↑"), down = Feedback.el("button", "↓");
      up.type = down.type = "button";
      up.title = "move up"; down.title = "move down";
      up.className = "up"; down.className = "down";
      up.addEventListener("click", () => move(li, -1));
      down.addEventListener("click", () => move(li, +1));
      moves.append(up, down);
      li.append(moves);
      li.addEventListener("dragstart", (e) => { li.classList.add("dragging"); e.dataTransfer.setData("text/plain", String(index)); e.dataTransfer.effectAllowed = "move"; });
      li.addEventListener("dragend", () => li.classList.remove("dragging"));
      li.addEventListener("dragover", (e) => {
        e.preventDefault();
        const dragged = list.querySelector("li.dragging");
        if (!dragged || dragged === li) return;
        const box = li.getBoundingClientRect();
        list.insertBefore(dragged, e.clientY < box.top + box.height / 2 ? li : li.nextSibling);
      });
      li.addEventListener("drop", (e) => e.preventDefault());
      list.append(li);
    }
    $("typed").textContent = typed.length ? "typed: " + typed.map((i) => i + 1).join(" > ") : "";
  }

  function move(li, delta) {
    const list = $("ranking");
    const items = [...list.children];
    const at = items.indexOf(li), to = at + delta;
    if (to < 0 || to >= items.length) return;
    if (delta < 0) list.insertBefore(li, items[to]); else list.insertBefore(items[to], li);
    typed = [];
    $("typed").textContent = "";
  }

  function typeNumber(n) {
    const index = n - 1;
    if (index < 0 || index >= item.responses.length || typed.includes(index)) return;
    typed.push(index);
    const rest = currentOrder().filter((i) => !typed.includes(i));
    renderRanking([...typed, ...rest]);
  }

  function untype() {
    if (!typed.length) return;
    typed.pop();
    renderRanking(currentOrder());
  }

  // --- answering -------------------------------------------------------------------------------
  async function send(answer) {
    if (busy || item === null) return;
    setBusy(true);
    $("status").textContent = "saving…";
    try {
      const result = await Feedback.api("POST", "/api/answers", { item_id: item.id, answer });
      showProgress(result.progress);
      await load();
    } catch (e) {
      if (e.status === 409 && /already answered/.test(e.message)) { await load(); return; }
      $("status").textContent = "not saved: answer again to retry";
      Feedback.showError(e);
      setBusy(false);
    }
  }

  const pairwise = (choice, strength) => send({ kind: "pairwise", choice, strength: strength || null });
  const ranked = () => send({ kind: "ranked", ranking: currentOrder() });
  const thumbs = (thumb) => send(thumb === "skip" ? { kind: "thumbs", skip: true }
                                              : { kind: "thumbs", thumb, comment: $("comment").value || null });

  for (const b of document.querySelectorAll("#pairwise button")) {
    b.addEventListener("click", () => pairwise(b.dataset.choice, b.dataset.strength));
  }
  for (const b of document.querySelectorAll("#thumbs button")) b.addEventListener("click", () => thumbs(b.dataset.thumb));
  $("submit-ranking").addEventListener("click", ranked);
  $("skip-ranking").addEventListener("click", () => send({ kind: "ranked", skip: true }));
  $("check-again").addEventListener("click", load);
  $("signout").addEventListener("click", Feedback.signOut);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const inField = e.target instanceof HTMLTextAreaElement || e.target instanceof HTMLInputElement;
    if (inField) { if (e.key === "Escape") e.target.blur(); return; }
    if (item === null || busy) return;
    const key = e.key;
    if (item.kind === "pairwise") {
      if (key === "a") pairwise("A", "better");
      else if (key === "A") pairwise("A", "much_better");
      else if (key === "b") pairwise("B", "better");
      else if (key === "B") pairwise("B", "much_better");
      else if (key === "t" || key === "T") pairwise("tie");
      else if (key === "s" || key === "S") pairwise("skip");
      else return;
    } else if (item.kind === "ranked") {
      if (/^[1-9]$/.test(key)) typeNumber(Number(key));
      else if (key === "Backspace") untype();
      else if (key === "Enter") ranked();
      else if (key === "s" || key === "S") send({ kind: "ranked", skip: true });
      else return;
    } else {
      if (key === "u" || key === "U") thumbs("up");
      else if (key === "d" || key === "D") thumbs("down");
      else if (key === "s" || key === "S") thumbs("skip");
      else if (key === "c" || key === "C") $("comment").focus();
      else return;
    }
    e.preventDefault();
  });

  (async () => {
    try {
      const me = await Feedback.api("GET", "/api/me");
      $("who").textContent = me.name;
      $("admin-link").hidden = !me.is_admin;
      showProgress(me.progress);
    } catch (e) { Feedback.showError(e); return; }
    await load();
  })();
})();
