"""Load and crash test of the feedback server on localhost: 20 simulated annotators submit 200 answers each
over HTTP while the server is killed with SIGKILL and restarted once. Afterwards the database holds every
acknowledged answer exactly once, with the payload that was sent, and nothing else but answers whose
acknowledgement the kill swallowed (each confirmed by a 409 "already answered" on retry)."""
from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request

from feedback_server import Server, write_candidates

from rlhf_jax.feedback.store import Store

ANNOTATORS, ANSWERS_EACH, OVERLAP = 20, 200, 2
KILL_AFTER = 1500  # acknowledged answers before the SIGKILL


class Annotator(threading.Thread):
    def __init__(self, name: str, token: str, server: Server, acked: list, deadline: float):
        super().__init__(name=name, daemon=True)
        self.who, self.token, self.server, self.acked_total, self.deadline = name, token, server, acked, deadline
        self.acked: dict[int, tuple[int, dict]] = {}  # item -> (answer id, payload)
        self.confirmed_after_retry: dict[int, dict] = {}  # item -> payload (409 after a lost reply)
        self.lost_replies = 0
        self.error: BaseException | None = None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, json); retries while the server is down (connection refused / reset / no reply)."""
        data = None if body is None else json.dumps(body).encode()
        while True:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"{self.who}: gave up")
            req = urllib.request.Request(self.server.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError):
                if method == "POST":
                    self.lost_replies += 1
                time.sleep(0.05)

    def run(self) -> None:
        try:
            while len(self.acked) + len(self.confirmed_after_retry) < ANSWERS_EACH:
                status, data = self.call("GET", "/api/next")
                assert status == 200, (status, data)
                item = data["item"]
                assert item is not None, f"{self.who}: no item left"
                payload = {"kind": "pairwise", "choice": "AB"[(item["id"] + len(self.who)) % 2],
                           "strength": None if item["id"] % 3 else "much_better"}
                lost_before = self.lost_replies
                status, data = self.call("POST", "/api/answers", {"item_id": item["id"], "answer": payload})
                if status == 201:
                    assert item["id"] not in self.acked
                    self.acked[item["id"]] = (data["answer_id"], payload)
                    self.acked_total.append(1)
                elif status == 409 and "already answered" in data["detail"] and self.lost_replies > lost_before:
                    self.confirmed_after_retry[item["id"]] = payload  # committed, then the server died before replying
                else:
                    raise AssertionError(f"{self.who}: item {item['id']}: {status} {data}")
        except BaseException as e:  # noqa: BLE001
            self.error = e


def test_sigkill_under_load_loses_and_duplicates_nothing(tmp_path):
    db = tmp_path / "fb.db"
    items = ANNOTATORS * ANSWERS_EACH // OVERLAP + 50
    cands = write_candidates(tmp_path / "c.jsonl", items, k=2)
    store = Store(db)  # accounts straight into the database (the add-annotator command is tested elsewhere)
    tokens = {f"ann{i:02d}": store.add_annotator(f"ann{i:02d}") for i in range(ANNOTATORS)}
    server = Server(["--db", str(db), "--candidates", str(cands), "--overlap", str(OVERLAP)], tmp_path / "server.log").start()
    acked: list = []
    deadline = time.monotonic() + 900
    threads = [Annotator(name, token, server, acked, deadline) for name, token in tokens.items()]
    try:
        for t in threads:
            t.start()
        while len(acked) < KILL_AFTER and any(t.is_alive() for t in threads):
            time.sleep(0.02)
        server.kill()
        killed_at = len(acked)
        time.sleep(0.5)
        server.start()  # the same database, port and candidate file (its items are already stored: no new ones)
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        server.stop()
    errors = [t.error for t in threads if t.error is not None]
    assert not errors, errors[:3]
    assert KILL_AFTER <= killed_at < ANNOTATORS * ANSWERS_EACH  # the kill really came mid-session

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT w.id, w.item_id, n.name, w.payload FROM answers w JOIN annotators n "
                            "ON n.id = w.annotator_id").fetchall()
        stored_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    assert stored_items == items  # the restart re-read the file without duplicating an item
    stored = {(name, item): (answer_id, json.loads(payload)) for answer_id, item, name, payload in rows}
    assert len(stored) == len(rows)  # one answer per (annotator, item)
    per_item: dict[int, int] = {}
    for _, item, _, _ in rows:
        per_item[item] = per_item.get(item, 0) + 1
    assert max(per_item.values()) <= OVERLAP
    acknowledged = 0
    for t in threads:
        assert len(t.acked) + len(t.confirmed_after_retry) == ANSWERS_EACH
        for item, (answer_id, payload) in t.acked.items():
            assert stored[(t.who, item)] == (answer_id, {**payload}), (t.who, item)
            acknowledged += 1
        for item, payload in t.confirmed_after_retry.items():
            assert stored[(t.who, item)][1] == payload
        mine = {item for (name, item) in stored if name == t.who}
        assert mine == set(t.acked) | set(t.confirmed_after_retry), t.who  # nothing more, nothing less
    assert acknowledged == len(acked) and len(rows) == ANNOTATORS * ANSWERS_EACH
