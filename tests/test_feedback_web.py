"""The feedback web app's API and store: auth on every endpoint, validation, overlap and assignment,
agreement through the app against hand computations, exports that the training scripts read."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sqlite3
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from feedback_server import ROOT, write_candidates

from rlhf_jax.data.formats import load_rows
from rlhf_jax.feedback import export, items
from rlhf_jax.feedback.server import create_app
from rlhf_jax.feedback.store import Store


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def app(tmp_path):
    """Nine items (pairwise, ranked of 3, thumbs, alternating), overlap 2; alice, bob, carol and an admin."""
    store = Store(tmp_path / "fb.db", overlap=2)
    store.add_items(items.read_candidates(write_candidates(tmp_path / "c.jsonl", 9), ["pairwise", "ranked", "thumbs"], 3))
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob", "carol")}
    tokens["admin"] = store.add_annotator("admin", admin=True)
    return store, TestClient(create_app(store)), tokens


def answer_for(item: dict, choice: str = "A") -> dict:
    if item["kind"] == "pairwise":
        return {"kind": "pairwise", "choice": choice, "strength": None}
    if item["kind"] == "ranked":
        return {"kind": "ranked", "ranking": list(range(len(item["responses"])))}
    return {"kind": "thumbs", "thumb": "up", "comment": None}


def take_and_answer(client, token, choice="A") -> dict:
    item = client.get("/api/next", headers=bearer(token)).json()["item"]
    r = client.post("/api/answers", headers=bearer(token), json={"item_id": item["id"], "answer": answer_for(item, choice)})
    assert r.status_code == 201, r.text
    return item


ENDPOINTS = [("GET", "/api/me"), ("GET", "/api/next"), ("POST", "/api/answers"), ("GET", "/api/answers"),
             ("GET", "/api/annotators/bob/answers"), ("GET", "/api/admin/report"),
             *[("GET", f"/api/admin/export/{k}") for k in ("pairwise", "ranked", "binary", "agreement")]]
ADMIN_ONLY = {"/api/admin/report", *[f"/api/admin/export/{k}" for k in ("pairwise", "ranked", "binary", "agreement")]}


def test_auth_on_every_endpoint(app):
    """Missing, wrong and malformed tokens get 401 everywhere; alice gets 403 on bob's answers and on admin
    endpoints and 2xx on her own; the admin gets 2xx everywhere."""
    store, client, tokens = app
    take_and_answer(client, tokens["bob"])
    headers = {"missing": {}, "wrong": bearer("not-a-token"), "basic": {"Authorization": f"Basic {tokens['alice']}"},
               "empty": {"Authorization": "Bearer "}, "alice": bearer(tokens["alice"]), "admin": bearer(tokens["admin"])}
    expected = {"missing": 401, "wrong": 401, "basic": 401, "empty": 401}
    seen = []
    for method, path in ENDPOINTS:
        body = {"item_id": 9, "answer": {"kind": "thumbs", "thumb": "up"}} if method == "POST" else None  # assigned to nobody
        for who, h in headers.items():
            r = client.request(method, path, headers=h, json=body)
            if who in expected:
                want = 401
            elif who == "alice":
                want = 403 if (path in ADMIN_ONLY or "/bob/" in path) else (409 if method == "POST" else 200)
            else:
                want = 409 if method == "POST" else 200  # item 1 is not assigned to the admin
            seen.append((method, path, who, r.status_code))
            assert r.status_code == want, (method, path, who, r.status_code, r.text)
            if want in (401, 403):
                assert set(r.json()) == {"detail"}  # nothing but the reason
            if want == 401:
                assert r.headers["www-authenticate"] == "Bearer"
    assert len(seen) == len(ENDPOINTS) * len(headers)


def test_an_annotator_sees_only_their_own_answers(app):
    store, client, tokens = app
    mine = take_and_answer(client, tokens["alice"])
    take_and_answer(client, tokens["bob"], choice="B")
    take_and_answer(client, tokens["bob"], choice="B")
    own = client.get("/api/answers", headers=bearer(tokens["alice"])).json()
    assert own["annotator"] == "alice" and [a["item"]["id"] for a in own["answers"]] == [mine["id"]]
    assert client.get("/api/annotators/alice/answers", headers=bearer(tokens["alice"])).json() == own
    bob = client.get("/api/annotators/bob/answers", headers=bearer(tokens["admin"])).json()
    assert [a["answer"]["kind"] for a in bob["answers"]] == ["pairwise", "ranked"]
    assert bob["answers"][0]["answer"]["choice"] == "B"
    assert client.get("/api/annotators/nobody/answers", headers=bearer(tokens["admin"])).status_code == 404
    assert "gold" not in own["answers"][0]["item"] and "source" not in own["answers"][0]["item"]


@pytest.mark.parametrize("answer, status, field", [
    ({"kind": "ranked", "ranking": [0, 1]}, 422, "kind"),
    ({"kind": "pairwise", "choice": "C"}, 422, "choice"),
    ({"kind": "pairwise", "choice": "tie", "strength": "better"}, 422, "strength"),
    ({"kind": "pairwise", "choice": "A", "strength": "slightly"}, 422, "strength"),
    ({"kind": "pairwise", "choice": "A", "extra": 1}, 422, "extra"),
    ("A", 422, "answer"),
])
def test_pairwise_answers_are_validated(app, answer, status, field):
    store, client, tokens = app
    item = client.get("/api/next", headers=bearer(tokens["alice"])).json()["item"]
    assert item["kind"] == "pairwise"
    r = client.post("/api/answers", headers=bearer(tokens["alice"]), json={"item_id": item["id"], "answer": answer})
    assert r.status_code == status and f"{field}:" in r.json()["detail"], r.text
    assert store.answers() == []  # nothing half-written


def test_ranked_and_thumbs_answers_are_validated(app):
    store, client, tokens = app
    h = bearer(tokens["alice"])
    take_and_answer(client, tokens["alice"])  # item 1, pairwise
    ranked = client.get("/api/next", headers=h).json()["item"]
    assert ranked["kind"] == "ranked" and len(ranked["responses"]) == 3
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], [True, 0, 2], "012", None):
        r = client.post("/api/answers", headers=h, json={"item_id": ranked["id"], "answer": {"kind": "ranked", "ranking": bad}})
        assert r.status_code == 422 and "ranking:" in r.json()["detail"], (bad, r.text)
    r = client.post("/api/answers", headers=h, json={"item_id": ranked["id"], "answer": {"kind": "ranked", "skip": True, "ranking": [0, 1, 2]}})
    assert r.status_code == 422
    assert client.post("/api/answers", headers=h, json={"item_id": ranked["id"], "answer": {"kind": "ranked", "ranking": [2, 0, 1]}}).status_code == 201
    thumbs = client.get("/api/next", headers=h).json()["item"]
    for bad, field in (({"kind": "thumbs", "thumb": "meh"}, "thumb"), ({"kind": "thumbs", "thumb": "up", "comment": 3}, "comment"),
                       ({"kind": "thumbs", "thumb": "up", "comment": "x" * 2001}, "comment")):
        r = client.post("/api/answers", headers=h, json={"item_id": thumbs["id"], "answer": bad})
        assert r.status_code == 422 and f"{field}:" in r.json()["detail"], r.text
    for body in ({"item_id": "3", "answer": {}}, {"item_id": True, "answer": {}}, {"item": 3}, [1, 2]):
        r = client.post("/api/answers", headers=h, json=body)
        assert r.status_code == 422, (body, r.text)
    assert client.post("/api/answers", headers=h, content=b"{not json", ).status_code == 422
    assert [a.payload for a in store.answers()][1] == {"kind": "ranked", "ranking": [2, 0, 1]}


def test_unknown_replayed_and_unassigned_answers(app):
    store, client, tokens = app
    h = bearer(tokens["alice"])
    r = client.post("/api/answers", headers=h, json={"item_id": 999, "answer": {"kind": "pairwise", "choice": "A"}})
    assert r.status_code == 404 and "no such item" in r.json()["detail"]
    r = client.post("/api/answers", headers=h, json={"item_id": 4, "answer": {"kind": "pairwise", "choice": "A"}})
    assert r.status_code == 409 and "not assigned" in r.json()["detail"]
    item = take_and_answer(client, tokens["alice"])
    r = client.post("/api/answers", headers=h, json={"item_id": item["id"], "answer": answer_for(item, "B")})
    assert r.status_code == 409 and "already answered" in r.json()["detail"]
    assert [(a.annotator, a.payload["choice"]) for a in store.answers()] == [("alice", "A")]  # the first answer stands


def test_overlap_assignment_and_reload(app):
    """The same item until it is answered; each item to at most 2 annotators and never twice to one."""
    store, client, tokens = app
    first = client.get("/api/next", headers=bearer(tokens["alice"])).json()["item"]
    assert client.get("/api/next", headers=bearer(tokens["alice"])).json()["item"] == first  # a reload
    assert client.get("/api/next", headers=bearer(tokens["bob"])).json()["item"]["id"] == first["id"]  # overlap 2
    assert client.get("/api/next", headers=bearer(tokens["carol"])).json()["item"]["id"] != first["id"]
    for name in ("alice", "bob", "carol"):
        while True:
            data = client.get("/api/next", headers=bearer(tokens[name])).json()
            if data["item"] is None:
                assert data["progress"]["left"] == 0
                break
            r = client.post("/api/answers", headers=bearer(tokens[name]), json={"item_id": data["item"]["id"], "answer": answer_for(data["item"])})
            assert r.status_code == 201
    per_item = {}
    for a in store.answers():
        per_item.setdefault(a.item.id, []).append(a.annotator)
    assert sorted(per_item) == list(range(1, 10))
    assert all(len(names) == 2 and len(set(names)) == 2 for names in per_item.values()), per_item
    assert store.progress(store.annotator("alice"))["answered"] + store.progress(store.annotator("bob"))["answered"] \
        + store.progress(store.annotator("carol"))["answered"] == 18


def test_an_expired_assignment_frees_its_slot(tmp_path):
    store = Store(tmp_path / "fb.db", overlap=2, lease_s=0.0)
    store.add_items(items.read_candidates(write_candidates(tmp_path / "c.jsonl", 3), ["pairwise"], 3))
    alice, bob, carol = (store.annotator(n) for n in [store.add_annotator(n) and n for n in ("alice", "bob", "carol")])
    assert store.next_item(alice).id == 1  # alice walks away; with a zero lease her slot is free at once
    for who in (bob, carol):
        assert store.next_item(who).id == 1
        store.submit(who, 1, {"kind": "pairwise", "choice": "B"})
    assert store.next_item(alice).id == 2  # item 1 has its two answers: taken back from alice
    with pytest.raises(Exception, match="not assigned"):
        store.submit(alice, 1, {"kind": "pairwise", "choice": "A"})


def test_the_overlap_of_a_database_is_fixed(tmp_path):
    Store(tmp_path / "fb.db").add_annotator("alice")  # accounts before the first serve fix nothing
    Store(tmp_path / "fb.db", overlap=3)
    assert Store(tmp_path / "fb.db").overlap == 3
    with pytest.raises(ValueError, match="overlap 3"):
        Store(tmp_path / "fb.db", overlap=2)
    assert Store(tmp_path / "other.db", fix_overlap=True).overlap == 1  # a serve without --overlap fixes 1
    with pytest.raises(ValueError, match="overlap 1"):
        Store(tmp_path / "other.db", overlap=2)


def test_candidate_file_errors_name_file_line_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": ["a", "a"]}\n')
    with pytest.raises(Exception, match=r"c\.jsonl:2.*responses.*2 distinct"):
        items.read_candidates(path, ["pairwise"], 4)
    path.write_text('{"prompt": "p", "responses": "ab"}\n')
    with pytest.raises(Exception, match=r"c\.jsonl:1.*responses"):
        items.read_candidates(path, ["pairwise"], 4)
    path.write_text('{"prompt": "", "responses": ["a", "b"]}\n')
    with pytest.raises(Exception, match=r"c\.jsonl:1.*prompt"):
        items.read_candidates(path, ["pairwise"], 4)
    path.write_text('{"prompt": "p", "responses": ["a", "b", "c"]}\n')
    with pytest.raises(Exception, match=r"c\.jsonl:1.*ranked.*4 distinct"):
        items.read_candidates(path, ["ranked"], 4)


def test_pages_carry_no_data_and_a_strict_csp(app):
    store, client, tokens = app
    for page in ("/", "/annotate", "/admin"):
        r = client.get(page)
        assert r.status_code == 200 and "Question" not in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"] and "<script>" not in r.text
    for asset in ("common.js", "annotate.js", "admin.js", "login.js"):
        assert "innerHTML" not in (ROOT / "rlhf_jax/feedback/static" / asset).read_text()


def test_agreement_through_the_app_equals_a_hand_computation(tmp_path):
    """Two annotators label the same 8 pairwise items: A/B/tie tables give κ by hand; gold agreement too."""
    store = Store(tmp_path / "fb.db", overlap=2)
    cands = [{"kind": "pairwise", "prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"], "source": "s", "prompt_index": i,
              "gold": [1.0, 0.0] if i % 2 == 0 else [0.0, 1.0]} for i in range(8)]
    store.add_items(cands)
    x_labels = ["A", "A", "B", "B", "A", "tie", "B", "A"]
    y_labels = ["A", "B", "B", "B", "A", "tie", "A", "A"]
    for name, labels in (("x", x_labels), ("y", y_labels)):
        store.add_annotator(name)
        who = store.annotator(name)
        for label in labels:
            item = store.next_item(who)
            store.submit(who, item.id, {"kind": "pairwise", "choice": label})
    # by hand: agreements on items 0,2,3,4,5,7 -> p_o = 6/8
    # marginals x: A 4, B 3, tie 1; y: A 4, B 3, tie 1 -> p_e = (4*4 + 3*3 + 1*1) / 64 = 26/64
    p_o, p_e = 6 / 8, 26 / 64
    kappa = (p_o - p_e) / (1 - p_e)
    rep = export.report(store)["by_kind"]["pairwise"]
    assert rep["cohen_kappa"]["x|y"]["n"] == 8
    assert rep["cohen_kappa"]["x|y"]["kappa"] == pytest.approx(kappa, abs=1e-12)
    assert rep["percent_agreement"] == pytest.approx(6 / 8)
    # gold: A on even items, B on odd; x matches on items 0, 3, 4 -> 3/8 (its tie on item 5 is a miss),
    # y on items 0, 1, 3, 4, 6 -> 5/8
    assert rep["per_annotator"]["x"]["gold_agreement"] == pytest.approx(3 / 8)
    assert rep["per_annotator"]["y"]["gold_agreement"] == pytest.approx(5 / 8)
    assert rep["gold_agreement"] == pytest.approx(8 / 16)
    assert rep["ties"] == 2 and rep["skipped"] == 0  # both said tie on item 5


def _fill_with_simulated_answers(db: pathlib.Path, n: int) -> Store:
    """n pairwise, n/2 ranked and n/2 thumbs items of the simulated task, answered by the simulated annotator (two
    annotators, overlap 1 so every item has one answer)."""
    from rlhf_jax.data import simulated
    from rlhf_jax.data.simulated.annotator import Annotator

    store = Store(db, overlap=1)
    ranked = simulated.ranked_rows(n, seed=3, k=3)
    cands = [{"kind": "pairwise", "prompt": r["prompt"], "responses": r["responses"][:2], "source": "sim", "prompt_index": i}
             for i, r in enumerate(ranked)]
    cands += [{"kind": "ranked", "prompt": r["prompt"], "responses": r["responses"], "source": "sim", "prompt_index": n + i}
              for i, r in enumerate(ranked[: n // 2])]
    cands += [{"kind": "thumbs", "prompt": r["prompt"], "responses": r["responses"][:1], "source": "sim",
               "prompt_index": 2 * n + i} for i, r in enumerate(ranked[: n // 2])]
    store.add_items(cands)
    judge = Annotator(5)
    for name in ("ann1", "ann2"):
        store.add_annotator(name)
    people = [store.annotator("ann1"), store.annotator("ann2")]
    turn = 0
    while True:
        who = people[turn % 2]
        turn += 1
        item = store.next_item(who)
        if item is None:
            break
        if item.kind == "pairwise":
            choice = "A" if judge.compare(item.prompt, *item.responses) == 0 else "B"
            answer = {"kind": "pairwise", "choice": choice, "strength": "much_better" if turn % 3 == 0 else None}
        elif item.kind == "ranked":
            answer = {"kind": "ranked", "ranking": judge.rank(item.prompt, item.responses)}
        else:
            answer = {"kind": "thumbs", "thumb": "up" if judge.thumb(item.prompt, item.responses[0]) else "down",
                      "comment": "ok"}
        store.submit(who, item.id, answer)
    return store


def test_exports_are_read_by_the_project_loaders(tmp_path):
    store = _fill_with_simulated_answers(tmp_path / "fb.db", 12)
    written = export.export(store, tmp_path / "out")
    assert written == {"pairwise.jsonl": 12, "ranked.jsonl": 6, "binary.jsonl": 6, "agreement.json": 1}
    pairs = load_rows(tmp_path / "out/pairwise.jsonl", "pairwise")
    ranked = load_rows(tmp_path / "out/ranked.jsonl", "ranked")
    binary = load_rows(tmp_path / "out/binary.jsonl", "binary")
    assert len(pairs) == 12 and len(ranked) == 6 and len(binary) == 6
    assert sorted(p.margin for p in pairs if p.margin is not None) == [2.0] * 4  # much better on every third turn
    raw = [json.loads(line) for line in (tmp_path / "out/pairwise.jsonl").read_text().splitlines()]
    assert {r["meta"]["annotator"] for r in raw} == {"ann1", "ann2"}
    by_item = {a.item.id: a for a in store.answers()}
    for r in raw:  # chosen is the response the annotator picked
        a = by_item[r["meta"]["item"]]
        assert r["chosen"] == a.item.responses[0 if a.payload["choice"] == "A" else 1]
    agreement = json.loads((tmp_path / "out/agreement.json").read_text())
    assert agreement["counts"]["items"] == {"pairwise": 12, "ranked": 6, "thumbs": 6}


def _script_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env.setdefault("RLHF_JAX_COMPILE_CACHE", str(ROOT / ".cache" / "jax_scripts"))
    return env


def _rows_read(stdout: str) -> int:
    import re

    found = re.search(r"(\d+) rows \(\d+ prompts\) held out for evaluation.*?, (\d+) rows for training", stdout)
    assert found, stdout[-2000:]
    return int(found.group(1)) + int(found.group(2))


@pytest.mark.slow
def test_exported_rows_train_the_reward_model_and_dpo(tmp_path):
    """The CLI's export, as it is, trains reward_model.py, dpo.py (pairwise rows) and kto.py (thumbs) end to end
    (tiny budgets)."""
    _fill_with_simulated_answers(tmp_path / "fb.db", 24)
    subprocess.run([sys.executable, "-m", "rlhf_jax.feedback.web", "export", "--db", str(tmp_path / "fb.db"),
                    "--out", str(tmp_path / "out")], check=True, cwd=ROOT, capture_output=True)
    from rlhf_jax import model_io
    from rlhf_jax.cli import ModelArgs

    base = model_io.export_lm(tmp_path / "base", *model_io.load_lm(ModelArgs()))  # the embedded model, untrained
    common = ["--model.path", str(base), "--data.path", str(tmp_path / "out/pairwise.jsonl"), "--data.eval-fraction",
              "0.25", "--run.out", str(tmp_path / "run")]
    rm = subprocess.run([sys.executable, "experiments/reward_model.py", *common, "--steps", "2", "--batch-size", "4",
                         "--eval-every", "2", "--normalize-samples", "0", "--run.save-every", "1000"],
                        cwd=ROOT, capture_output=True, text=True, env=_script_env())
    assert rm.returncode == 0, rm.stderr[-3000:]
    result = json.loads((tmp_path / "run/rm/eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["feedback"] == "pairwise"
    assert _rows_read(rm.stdout) == 24, rm.stdout[-2000:]  # every exported row, held out or trained on
    dpo = subprocess.run([sys.executable, "experiments/dpo.py", *common, "--steps", "2", "--batch-size", "4",
                          "--eval-every", "2", "--num-eval-prompts", "4", "--run.save-every", "1000"],
                         cwd=ROOT, capture_output=True, text=True, env=_script_env())
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert _rows_read(dpo.stdout) == 24, dpo.stdout[-2000:]
    assert (tmp_path / "run/dpo/hf/config.json").exists()
    kto = subprocess.run([sys.executable, "experiments/kto.py", *common[:2], "--data.path", str(tmp_path / "out/binary.jsonl"),
                          "--data.eval-fraction", "0.25", "--run.out", str(tmp_path / "run"), "--steps", "2",
                          "--batch-size", "4", "--eval-every", "2", "--num-eval-prompts", "4", "--run.save-every", "1000"],
                         cwd=ROOT, capture_output=True, text=True, env=_script_env())
    assert kto.returncode == 0, kto.stderr[-3000:]
    assert _rows_read(kto.stdout) == 12, kto.stdout[-2000:]  # the thumbs answers
    with sqlite3.connect(tmp_path / "fb.db") as conn:  # the export only reads
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 48


def test_the_pipelines_next_round_takes_its_comparisons_from_the_database(tmp_path):
    """pipeline.py --feedback-db: round 2's new comparisons are the database's A/B answers to items sampled from
    the round-start policy (ties, skips and other sources excluded), a fifth of the prompts held out."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import pipeline

    from rlhf_jax.data import simulated

    policy = tmp_path / "run" / "ppo" / "hf"
    store = Store(tmp_path / "fb.db", overlap=2)
    prompts = [r["prompt"] for r in simulated.prompt_rows(40, 1, "train")]
    source = f"policy:{policy.resolve()}"
    store.add_items([{"kind": "pairwise", "prompt": p, "responses": [f" yes {i}", f" no {i}"], "source": source,
                      "prompt_index": i} for i, p in enumerate(prompts)]
                    + [{"kind": "pairwise", "prompt": "other", "responses": ["a", "b"], "source": "file:x", "prompt_index": 0}])
    for name in ("ann1", "ann2"):
        store.add_annotator(name)
        who = store.annotator(name)
        while (item := store.next_item(who)) is not None:
            choice = "tie" if item.prompt_index % 10 == 9 and name == "ann1" else "AB"[item.prompt_index % 2]
            store.submit(who, item.id, {"kind": "pairwise", "choice": choice})
    cfg = pipeline.cli(["--out", str(tmp_path / "run"), "--rounds", "2", "--feedback-db", str(tmp_path / "fb.db"),
                        "--rm.data.num-train", "64"])
    train_file, eval_file = pipeline.annotate_policy_samples(cfg, 2, str(policy), tmp_path / "run" / "round2")
    new = [json.loads(x) for x in (tmp_path / "run/round2/new_comparisons.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in eval_file.read_text().splitlines()]
    everything = [json.loads(x) for x in train_file.read_text().splitlines()]
    assert len(new) + len(held) == 2 * 40 - 4  # ann1's four ties make no row; item "other" is another source
    assert len(everything) == 64 + len(new)  # round 1's simulated comparisons, then the database's
    assert {r["prompt"] for r in new}.isdisjoint({r["prompt"] for r in held}) and 4 <= len({r["prompt"] for r in held}) <= 16
    assert all(r["chosen"].startswith(" yes") == (r["meta"]["prompt_index"] % 2 == 0) for r in new + held)
    assert {r["meta"]["annotator"] for r in new} == {"ann1", "ann2"}
    cfg = dataclasses.replace(cfg, feedback_db=str(tmp_path / "empty.db"))
    Store(tmp_path / "empty.db")
    with pytest.raises(ValueError, match="no A/B answers to pairwise items sampled from"):
        pipeline.annotate_policy_samples(cfg, 2, str(policy), tmp_path / "run" / "round2b")


def test_a_policy_is_sampled_in_the_background_ahead_of_the_annotators(tmp_path):
    """--policy: items appear in the background, at most a batch beyond ``ahead`` open items; answering makes
    the sampler go on; a restarted sampler continues after the last stored prompt with the same draws a single
    run makes; the gold judge's scores are stored per response."""
    import time

    from rlhf_jax import model_io, rewards
    from rlhf_jax.cli import ModelArgs
    from rlhf_jax.data.simulated import gold_scores

    base = model_io.export_lm(tmp_path / "base", *model_io.load_lm(ModelArgs()))
    prompts = items.read_prompts("simulated:12")

    def sampler(store):
        return items.PolicySampler(store, str(base), prompts, tasks=["pairwise", "ranked", "thumbs"], ranking_size=3,
                                   gold=rewards.gold, ahead=4, seed=7, max_new_tokens=12, temperature=1.0, top_p=None,
                                   batch_size=4)

    def wait(store, s, n):
        deadline = time.monotonic() + 300
        while store.open_items() < n and not s.done and s.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # would it sample more than it should?
        assert s.error is None, s.error

    store = Store(tmp_path / "a.db", overlap=1)
    s = sampler(store).start()
    wait(store, s, 4)
    assert store.next_prompt_index(s.source) == 4 and store.open_items() == 4 - s.skipped  # one batch, then it waits
    store.add_annotator("ann")
    who = store.annotator("ann")
    for _ in range(3):
        item = store.next_item(who)
        store.submit(who, item.id, {"kind": item.kind, **({"choice": "A"} if item.kind == "pairwise" else
                                                          {"skip": True})})
    wait(store, s, 4)
    s.stop()
    assert store.next_prompt_index(s.source) == 8
    restarted = sampler(store)
    assert restarted.fill(store.next_prompt_index(s.source)) == 12  # goes on at prompt 8
    one_run = Store(tmp_path / "b.db", overlap=1)
    straight = sampler(one_run)
    for start in (0, 4, 8):
        straight.fill(start)
    got = {(a.prompt_index, a.kind): (a.prompt, a.responses, a.gold) for a in _items(store)}
    want = {(a.prompt_index, a.kind): (a.prompt, a.responses, a.gold) for a in _items(one_run)}
    assert got == want and len(got) == 12 - s.skipped - restarted.skipped
    kinds = {k for (_, k) in got}
    assert kinds == {"pairwise", "ranked", "thumbs"}
    for (i, kind), (prompt, responses, gold) in got.items():
        assert prompt == prompts[i] and kind == ("pairwise", "ranked", "thumbs")[i % 3]
        assert len(responses) == {"pairwise": 2, "ranked": 3, "thumbs": 1}[kind] and len(set(responses)) == len(responses)
        assert gold == pytest.approx(gold_scores([prompt] * len(responses), responses).tolist())


def _items(store: Store) -> list:
    with sqlite3.connect(store.path) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")]
    return [store.item(i) for i in ids]
