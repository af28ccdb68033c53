"use strict";
// The admin page: progress per annotator, item counts, agreement statistics, exports.
(() => {
  if (!Feedback.requireToken()) return;
  const $ = (id) => document.getElementById(id);
  const fmt = (x) => (x === null || x === undefined) ? "—" : (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : String(x));

  function table(headers, rows) {
    const t = Feedback.el("table");
    const head = Feedback.el("tr");
    for (const h of headers) head.append(Feedback.el("th", h));
    t.append(head);
    for (const row of rows) {
      const tr = Feedback.el("tr");
      for (const cell of row) tr.append(Feedback.el("td", fmt(cell)));
      t.append(tr);
    }
    return t;
  }

  async function refresh() {
    Feedback.showError(null);
    let report;
    try {
      const me = await Feedback.api("GET", "/api/me");
      $("who").textContent = me.name + " (admin)";
      report = await Feedback.api("GET", "/api/admin/report");
    } catch (e) { Feedback.showError(e); return; }
    const body = document.querySelector("#annotators tbody");
    body.replaceChildren();
    for (const a of report.annotators) {
      const tr = Feedback.el("tr");
      for (const cell of [a.name, a.answered, a.left, a.is_admin ? "yes" : ""]) tr.append(Feedback.el("td", fmt(cell)));
      body.append(tr);
    }
    $("counts").textContent = JSON.stringify(report.counts, null, 2);
    $("sampler").textContent = report.sampler ? JSON.stringify(report.sampler, null, 2) : "items from a file";
    const box = $("agreement");
    box.replaceChildren();
    for (const [kind, s] of Object.entries(report.by_kind)) {
      box.append(Feedback.el("h3", kind));
      box.append(table(["answers", "units with overlap", "% agreement", "Krippendorff α", "gold agreement", "skipped"],
                       [[s.answers_total, s.units_with_overlap, s.percent_agreement, s.krippendorff_alpha, s.gold_agreement, s.skipped]]));
      box.append(table(["annotator", "answers", "overlapping", "agreement with others", "gold agreement"],
                       Object.entries(s.per_annotator).map(([n, a]) => [n, a.answers, a.overlapping, a.agreement_with_others, a.gold_agreement])));
      const kappas = Object.entries(s.cohen_kappa);
      if (kappas.length) box.append(table(["annotator pair", "Cohen κ", "shared units"], kappas.map(([p, k]) => [p, k.kappa, k.n])));
    }
  }

  async function download(kind) {
    try {
      const response = await fetch("/api/admin/export/" + kind, { headers: { "Authorization": "Bearer " + Feedback.token() } });
      if (!response.ok) throw new Feedback.ApiError(response.status, (await response.json()).detail);
      const url = URL.createObjectURL(await response.blob());
      const a = Feedback.el("a");
      a.href = url;
      a.download = kind === "agreement" ? "agreement.json" : kind + ".jsonl";
      document.body.append(a);
      a.click();
      a.remove();
      URL.revokeObjectURL(url);
    } catch (e) { Feedback.showError(e); }
  }

  for (const b of document.querySelectorAll("[data-export]")) b.addEventListener("click", () => download(b.dataset.export));
  $("refresh").addEventListener("click", refresh);
  $("signout").addEventListener("click", Feedback.signOut);
  refresh();
})();
