"""The feedback database: items to judge, annotators, assignments and answers, in one SQLite file.

Durability: the database runs in WAL mode with ``synchronous=FULL``, and every answer is one
``BEGIN IMMEDIATE … COMMIT`` transaction, so an answer the server acknowledged is on disk and
survives a ``SIGKILL`` of the server (or a power cut). ``UNIQUE(item, annotator)`` on answers
makes a replayed or retried answer a clean 409, never a duplicate. Assignments are committed without
their own fsync (``synchronous=NORMAL``): they survive a crash of the server, and at worst a power cut
hands an item out again.

Tables:

- ``annotators(id, name, token_sha256, is_admin, created)``: the secret token itself is shown once
  by :func:`add_annotator` and only its SHA-256 is stored (tokens are 256-bit random, so a plain hash
  is enough: there is nothing to brute-force).
- ``items(id, kind, prompt, responses, gold, source, prompt_index, created)``: one task; ``kind`` is
  ``pairwise`` (2 responses), ``ranked`` (K responses) or ``thumbs`` (1 response); ``prompt`` is the
  JSON of a text or a conversation; ``gold`` the gold judge's score per response, or NULL.
- ``assignments(item_id, annotator_id, assigned)``: which items were handed to whom. An annotator's
  unanswered assignment is handed back on every ``next_item`` call (a reload shows the same item).
- ``answers(id, item_id, annotator_id, payload, created)``, ``UNIQUE(item_id, annotator_id)``.

Overlap: each item goes to at most ``overlap`` annotators and never twice to one. An assignment left
unanswered for ``lease_s`` stops counting against the overlap (an annotator who walked away does not
block an item forever); when they come back to an item that meanwhile got its ``overlap`` answers, it
is taken from them and they get the next one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

KINDS = ("pairwise", "ranked", "thumbs")
CHOICES = ("A", "B", "tie", "skip")
STRENGTHS = ("better", "much_better")
MAX_COMMENT = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  token_sha256 TEXT NOT NULL UNIQUE,
  is_admin INTEGER NOT NULL DEFAULT 0,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('pairwise', 'ranked', 'thumbs')),
  prompt TEXT NOT NULL,
  responses TEXT NOT NULL,
  gold TEXT,
  source TEXT NOT NULL,
  prompt_index INTEGER NOT NULL,
  created REAL NOT NULL,
  UNIQUE (source, prompt_index, kind)
);
CREATE TABLE IF NOT EXISTS assignments (
  item_id INTEGER NOT NULL REFERENCES items(id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  assigned REAL NOT NULL,
  PRIMARY KEY (item_id, annotator_id)
);
CREATE TABLE IF NOT EXISTS answers (
  id INTEGER PRIMARY KEY,
  item_id INTEGER NOT NULL REFERENCES items(id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  payload TEXT NOT NULL,
  created REAL NOT NULL,
  UNIQUE (item_id, annotator_id)
);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments(annotator_id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class FeedbackError(Exception):
    """A request the store refuses: ``status`` is the HTTP status the web app answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclasses.dataclass(frozen=True)
class Item:
    id: int
    kind: str
    prompt: Any
    """Text, or a conversation (a list of ``{"role", "content"}`` messages)."""
    responses: list[str]
    gold: list[float] | None
    source: str
    prompt_index: int

    def public(self) -> dict[str, Any]:
        """What an annotator is shown: no gold, no source."""
        return {"id": self.id, "kind": self.kind, "prompt": self.prompt, "responses": self.responses}


@dataclasses.dataclass(frozen=True)
class Answer:
    id: int
    item: Item
    annotator: str
    payload: dict[str, Any]
    created: float


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def connect(path: str | os.PathLike, *, durable: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL. ``durable``: every commit is
    fsync'ed (``synchronous=FULL``: on disk when COMMIT returns, even if the machine loses power);
    otherwise (``NORMAL``) a commit survives a crash of the process but maybe not of the machine."""
    conn = sqlite3.connect(os.fspath(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (writers serialise at the start, not at the first write) … ``COMMIT``, or rollback."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Store:
    """The database at ``path``, created on first use. One ``Store`` per process; it opens a
    short-lived connection per call, so it is safe to share between the web server's threads."""

    def __init__(self, path: str | os.PathLike, *, overlap: int | None = None, lease_s: float = 3600.0,
                 fix_overlap: bool = False):
        """``overlap``: annotators per item. It is fixed in the database by the first ``Store`` that
        gives it or that says ``fix_overlap`` (the server does; ``add-annotator`` and ``export`` do not),
        and a later different value is an error. Unfixed and not given, it is 1."""
        self.path = os.fspath(path)
        self.lease_s = lease_s
        with contextlib.closing(connect(self.path)) as conn:
            conn.executescript(SCHEMA)
            stored = conn.execute("SELECT value FROM settings WHERE key = 'overlap'").fetchone()
            if overlap is not None and stored and int(stored[0]) != overlap:
                raise ValueError(f"{self.path}: this database was set up with --overlap {stored[0]}; "
                                 f"got --overlap {overlap} (the overlap of a database cannot change)")
            given = overlap is not None
            if overlap is None:
                overlap = int(stored[0]) if stored else 1
            if overlap < 1:
                raise ValueError(f"--overlap must be >= 1, got {overlap}")
            if given or fix_overlap:
                conn.execute("INSERT OR IGNORE INTO settings VALUES ('overlap', ?)", (str(overlap),))
        self.overlap = overlap

    @contextlib.contextmanager
    def _conn(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, durable=durable)
        try:
            yield conn
        finally:
            conn.close()

    # --- annotators -----------------------------------------------------------------------------

    def add_annotator(self, name: str, *, admin: bool = False) -> str:
        """Create an account; returns its secret token (shown once; only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"annotator name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        token = secrets.token_urlsafe(32)
        with self._conn() as conn, transaction(conn):
            if conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"{self.path}: an annotator named {name!r} exists already")
            conn.execute("INSERT INTO annotators (name, token_sha256, is_admin, created) VALUES (?, ?, ?, ?)",
                         (name, hash_token(token), int(admin), time.time()))
        return token

    def authenticate(self, token: str | None) -> Annotator | None:
        """The annotator whose token this is, or None."""
        if not token:
            return None
        with self._conn() as conn:
            row = conn.execute("SELECT id, name, is_admin FROM annotators WHERE token_sha256 = ?",
                               (hash_token(token),)).fetchone()
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    def annotator(self, name: str) -> Annotator | None:
        with self._conn() as conn:
            row = conn.execute("SELECT id, name, is_admin FROM annotators WHERE name = ?", (name,)).fetchone()
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    def annotators(self) -> list[Annotator]:
        with self._conn() as conn:
            rows = conn.execute("SELECT id, name, is_admin FROM annotators ORDER BY id").fetchall()
        return [Annotator(r[0], r[1], bool(r[2])) for r in rows]

    # --- items ----------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Mapping[str, Any]]) -> int:
        """Insert ``{kind, prompt, responses, gold?, source, prompt_index}`` records in one transaction;
        an item already stored (same source, prompt index and kind) is left as it is. Returns how many
        were new."""
        now = time.time()
        new = 0
        with self._conn() as conn, transaction(conn):
            for item in items:
                check_item(item)
                gold = item.get("gold")
                cur = conn.execute(
                    "INSERT OR IGNORE INTO items (kind, prompt, responses, gold, source, prompt_index, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item["kind"], json.dumps(item["prompt"], ensure_ascii=False),
                     json.dumps(list(item["responses"]), ensure_ascii=False),
                     None if gold is None else json.dumps([float(g) for g in gold]), item["source"],
                     int(item["prompt_index"]), now))
                new += cur.rowcount
        return new

    def next_prompt_index(self, source: str) -> int:
        """One past the highest prompt index stored for ``source`` (where a restarted sampler goes on)."""
        with self._conn() as conn:
            row = conn.execute("SELECT MAX(prompt_index) FROM items WHERE source = ?", (source,)).fetchone()
        return 0 if row[0] is None else row[0] + 1

    def open_items(self) -> int:
        """Items that still need answers (fewer than ``overlap`` answers and live assignments)."""
        with self._conn() as conn:
            return conn.execute(f"SELECT COUNT(*) FROM items i WHERE ({self._taken_sql()}) < ?",
                                (time.time() - self.lease_s, self.overlap)).fetchone()[0]

    def item(self, item_id: int) -> Item | None:
        with self._conn() as conn:
            return self._item(conn, item_id)

    @staticmethod
    def _item(conn: sqlite3.Connection, item_id: int) -> Item | None:
        row = conn.execute("SELECT id, kind, prompt, responses, gold, source, prompt_index FROM items WHERE id = ?",
                           (item_id,)).fetchone()
        return _item_from_row(row) if row else None

    @staticmethod
    def _taken_sql() -> str:
        """How many annotators hold item ``i``: answered, or assigned within the lease (parameter 1: lease start)."""
        return ("SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND (a.assigned >= ?1 OR EXISTS "
                "(SELECT 1 FROM answers w WHERE w.item_id = a.item_id AND w.annotator_id = a.annotator_id))")

    # --- the annotation loop ----------------------------------------------------------------------

    def next_item(self, annotator: Annotator) -> Item | None:
        """The annotator's current item: their unanswered assignment if they have one (so a reload
        shows the same item), else a new assignment of the oldest item that still needs an answer and
        that they have never been given. None when there is nothing left for them.

        An assignment is committed without an fsync of its own (it survives a crash of the server, and
        the next answer's fsync makes it durable); losing one to a power cut only hands its item out again."""
        now = time.time()
        with self._conn(durable=False) as conn, transaction(conn):
            open_row = conn.execute(
                "SELECT a.item_id FROM assignments a WHERE a.annotator_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM answers w WHERE w.item_id = a.item_id AND w.annotator_id = a.annotator_id) "
                "ORDER BY a.assigned, a.item_id LIMIT 1", (annotator.id,)).fetchone()
            if open_row is not None:
                answered = conn.execute("SELECT COUNT(*) FROM answers WHERE item_id = ?", (open_row[0],)).fetchone()[0]
                if answered < self.overlap:
                    return self._item(conn, open_row[0])
                # it expired and others filled its overlap meanwhile: take it back
                conn.execute("DELETE FROM assignments WHERE item_id = ? AND annotator_id = ?", (open_row[0], annotator.id))
            row = conn.execute(
                f"SELECT i.id FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments b WHERE b.item_id = i.id "
                f"AND b.annotator_id = ?2) AND ({self._taken_sql()}) < ?3 ORDER BY i.id LIMIT 1",
                (now - self.lease_s, annotator.id, self.overlap)).fetchone()
            if row is None:
                return None
            conn.execute("INSERT INTO assignments (item_id, annotator_id, assigned) VALUES (?, ?, ?)",
                         (row[0], annotator.id, now))
            return self._item(conn, row[0])

    def submit(self, annotator: Annotator, item_id: Any, payload: Any) -> int:
        """Validate and commit one answer (one transaction, on disk when this returns); its id.

        Raises FeedbackError: 404 unknown item, 422 an answer of the wrong kind or malformed, 409 an
        item not assigned to this annotator or already answered by them (a replay)."""
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise FeedbackError(422, f"item_id: expected an integer, got {item_id!r}")
        with self._conn() as conn, transaction(conn):
            item = self._item(conn, item_id)
            if item is None:
                raise FeedbackError(404, f"item {item_id}: no such item")
            clean = check_answer(item, payload)
            done = conn.execute("SELECT id, created FROM answers WHERE item_id = ? AND annotator_id = ?",
                                (item_id, annotator.id)).fetchone()
            if done is not None:
                raise FeedbackError(409, f"item {item_id}: already answered by {annotator.name} (answer {done[0]}); "
                                    "an answer cannot be replayed or changed")
            if conn.execute("SELECT 1 FROM assignments WHERE item_id = ? AND annotator_id = ?",
                            (item_id, annotator.id)).fetchone() is None:
                raise FeedbackError(409, f"item {item_id}: not assigned to {annotator.name}; "
                                    "answer the item GET /api/next gives you")
            cur = conn.execute("INSERT INTO answers (item_id, annotator_id, payload, created) VALUES (?, ?, ?, ?)",
                               (item_id, annotator.id, json.dumps(clean, ensure_ascii=False), time.time()))
            return int(cur.lastrowid)

    def progress(self, annotator: Annotator) -> dict[str, int]:
        """``answered`` by this annotator, items ``left`` for them (approximate under concurrency), ``items`` in all."""
        with self._conn() as conn:
            answered = conn.execute("SELECT COUNT(*) FROM answers WHERE annotator_id = ?", (annotator.id,)).fetchone()[0]
            current = conn.execute(
                "SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM answers w WHERE w.item_id = a.item_id AND w.annotator_id = a.annotator_id)",
                (annotator.id,)).fetchone()[0]
            fresh = conn.execute(
                f"SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments b WHERE b.item_id = i.id "
                f"AND b.annotator_id = ?2) AND ({self._taken_sql()}) < ?3",
                (time.time() - self.lease_s, annotator.id, self.overlap)).fetchone()[0]
            total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return {"answered": answered, "left": current + fresh, "items": total}

    # --- reading answers --------------------------------------------------------------------------

    def answers(self, annotator: Annotator | None = None) -> list[Answer]:
        """Every answer in commit order, or only ``annotator``'s."""
        query = ("SELECT w.id, w.payload, w.created, n.name, i.id, i.kind, i.prompt, i.responses, i.gold, i.source, "
                 "i.prompt_index FROM answers w JOIN annotators n ON n.id = w.annotator_id JOIN items i ON i.id = w.item_id")
        args: tuple = ()
        if annotator is not None:
            query += " WHERE w.annotator_id = ?"
            args = (annotator.id,)
        with self._conn() as conn:
            rows = conn.execute(query + " ORDER BY w.id", args).fetchall()
        return [Answer(r[0], _item_from_row(r[4:]), r[3], json.loads(r[1]), r[2]) for r in rows]

    def counts(self) -> dict[str, Any]:
        """Items per kind, answers per annotator, items with 0, 1, … answers."""
        with self._conn() as conn:
            kinds = dict(conn.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
            per_annotator = dict(conn.execute(
                "SELECT n.name, COUNT(w.id) FROM annotators n LEFT JOIN answers w ON w.annotator_id = n.id "
                "GROUP BY n.id ORDER BY n.id").fetchall())
            coverage = dict(conn.execute(
                "SELECT c, COUNT(*) FROM (SELECT (SELECT COUNT(*) FROM answers w WHERE w.item_id = i.id) AS c "
                "FROM items i) GROUP BY c").fetchall())
        return {"items": kinds, "answers_per_annotator": per_annotator, "overlap": self.overlap,
                "items_by_answer_count": {str(k): v for k, v in sorted(coverage.items())}}


def _item_from_row(row: Sequence[Any]) -> Item:
    return Item(id=row[0], kind=row[1], prompt=json.loads(row[2]), responses=json.loads(row[3]),
                gold=None if row[4] is None else json.loads(row[4]), source=row[5], prompt_index=row[6])


RESPONSES_PER_KIND = {"pairwise": 2, "thumbs": 1}


def check_item(item: Mapping[str, Any]) -> None:
    """An item record the store accepts, or ValueError naming its source and field."""
    where = f"{item.get('source', '<item>')}#{item.get('prompt_index', '?')}"
    kind = item.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    responses = item.get("responses")
    if not isinstance(responses, (list, tuple)) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: responses must be a list of texts")
    want = RESPONSES_PER_KIND.get(kind)
    if (want is not None and len(responses) != want) or (kind == "ranked" and len(responses) < 2):
        raise ValueError(f"{where}: a {kind} item needs {want or 'at least 2'} responses, got {len(responses)}")
    if kind != "thumbs" and len(set(responses)) != len(responses):
        raise ValueError(f"{where}: the responses of a {kind} item must differ")
    gold = item.get("gold")
    if gold is not None and (len(gold) != len(responses) or not all(math.isfinite(float(g)) for g in gold)):
        raise ValueError(f"{where}: gold must be one finite score per response")


def check_answer(item: Item, payload: Any) -> dict[str, Any]:
    """The normalised answer, or FeedbackError(422) naming the field that is wrong for this item."""
    def bad(field: str, message: str) -> FeedbackError:
        return FeedbackError(422, f"item {item.id} ({item.kind}): {field}: {message}")

    if not isinstance(payload, dict):
        raise bad("answer", "expected a JSON object")
    kind = payload.get("kind")
    if kind != item.kind:
        raise bad("kind", f"this is a {item.kind} item; got an answer of kind {kind!r}")
    allowed = {"pairwise": {"kind", "choice", "strength"}, "ranked": {"kind", "ranking", "skip"},
               "thumbs": {"kind", "thumb", "comment", "skip"}}[item.kind]
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise bad(unknown[0], f"unknown field (a {item.kind} answer has {', '.join(sorted(allowed))})")
    if item.kind == "pairwise":
        choice, strength = payload.get("choice"), payload.get("strength")
        if choice not in CHOICES:
            raise bad("choice", f"expected one of {', '.join(CHOICES)}, got {choice!r}")
        if strength is not None and (choice not in ("A", "B") or strength not in STRENGTHS):
            raise bad("strength", f"{', '.join(STRENGTHS)} or null, and only with choice A or B; got {strength!r}")
        return {"kind": "pairwise", "choice": choice, "strength": strength}
    if payload.get("skip") is True:
        if len(payload) != 2:
            raise bad("skip", "a skip carries no other field")
        return {"kind": item.kind, "skip": True}
    if "skip" in payload and payload["skip"] is not False:
        raise bad("skip", f"expected true or false, got {payload['skip']!r}")
    if item.kind == "ranked":
        ranking = payload.get("ranking")
        k = len(item.responses)
        if (not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking)
                or sorted(ranking) != list(range(k))):
            raise bad("ranking", f"expected a permutation of 0..{k - 1} (best first), got {ranking!r}")
        return {"kind": "ranked", "ranking": ranking}
    thumb, comment = payload.get("thumb"), payload.get("comment")
    if thumb not in ("up", "down"):
        raise bad("thumb", f"expected up or down, got {thumb!r}")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise bad("comment", f"text of at most {MAX_COMMENT} characters, or null")
    return {"kind": "thumbs", "thumb": thumb, "comment": (comment or "").strip() or None}
