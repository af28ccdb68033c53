"""Collect human comparisons in the terminal, crash-safe, into the pairwise format.

For each prompt the sampler draws two responses, a deterministic function of ``(seed, prompt
index)``; the person types ``1`` or ``2`` (the better one), ``t`` (tie), ``s`` (skip) or ``q``
(quit), and with ``thumbs`` also ``u`` / ``d`` / ``-`` for each response.

Files (JSON Lines, one answer per line, append-only, each line flushed and ``os.fsync``'ed before
the next pair is shown):

- ``out``: every decisive answer as a pairwise row ``{prompt, chosen, rejected, meta}``; it loads
  directly with ``rlhf_jax.data.formats.load_rows(out, "pairwise")``.
- ``undecided_path(out)`` (``answers.undecided.jsonl`` beside ``answers.jsonl``): ties and skips,
  ``{prompt, responses: [r1, r2], meta}``, kept out of ``out`` so that they are never read as
  preferences, but recorded so that a restart does not ask them again.

``meta`` = ``{prompt_index, choice ("1", "2", "tie", "skip"), seed}`` (+ ``thumbs``: one of
true / false / null per response, in the order shown).

Restart = run the same command again: the answered prompt indices are read back from both files
and collection resumes at the first unanswered prompt, showing the same pair as before (samples
are re-derived from ``(seed, index)``). An answer counts as recorded once its line, newline
included, is on disk, so a kill loses at most the answer being typed and never duplicates one. A
last line without its newline (a kill during the write) is reported on stderr and cut from the file;
that prompt is asked again. Any other unreadable line is an error naming ``file:line:field``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import IO, Any, Protocol, Sequence

from rlhf_jax.data import validation as v
from rlhf_jax.data.formats import read_records
from rlhf_jax.data.validation import DataError

CHOICES = {"1": "1", "2": "2", "t": "tie", "s": "skip"}
THUMBS = {"u": True, "d": False, "-": None}


class Sampler(Protocol):
    """Two responses to ``prompt``, a deterministic function of ``(prompt, seed, index)``."""

    def __call__(self, prompt: str, seed: int, index: int) -> tuple[str, str]: ...


def undecided_path(out: str | os.PathLike) -> pathlib.Path:
    """Where ties and skips go: ``answers.jsonl`` -> ``answers.undecided.jsonl``."""
    out = pathlib.Path(out)
    return out.with_name(f"{out.stem}.undecided{out.suffix or '.jsonl'}")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``prompt`` field (text) of every record of a JSON Lines or Parquet file, in order."""
    prompts = []
    for source, record in read_records(path):
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict):
            raise DataError(source, "<row>", "not_an_object", f"expected a JSON object, got {type(record).__name__}")
        prompt = v.require(record, "prompt", source)
        if not isinstance(prompt, str):
            raise DataError(source, "prompt", "wrong_type", "the collector takes text prompts; render conversations "
                            "with the tokenizer's chat template first")
        prompts.append(v.text(prompt, "prompt", source))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _recorded(path: pathlib.Path, prompts: Sequence[str], seed: int) -> dict[int, str]:
    """``{prompt index: "file:line"}`` of the answers in ``path``, after cutting a truncated last line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    if tail:
        line = data[: len(data) - len(tail)].count(b"\n") + 1
        print(f"{path}:{line}: cutting a truncated last line ({len(tail)} bytes) left by an interrupted write; "
              "its prompt will be asked again", file=sys.stderr)
        os.truncate(path, len(data) - len(tail))
    answered: dict[int, str] = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        source = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(source, "<json>", "bad_json", f"invalid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("meta"), dict):
            raise DataError(source, "meta", "missing_field", "expected a JSON object with a meta object")
        meta = row["meta"]
        index = v.require(meta, "prompt_index", source, prefix="meta.")
        if not isinstance(index, int) or not 0 <= index < len(prompts):
            raise DataError(source, "meta.prompt_index", "wrong_type", f"{index!r} is not an index into the {len(prompts)} prompts")
        if meta.get("seed") != seed:
            raise ValueError(f"{source}:meta.seed: answers were collected with seed {meta.get('seed')!r}, "
                             f"but this run uses seed {seed}; rerun with --seed {meta.get('seed')!r}")
        if row.get("prompt") != prompts[index]:
            raise ValueError(f"{source}:prompt: differs from prompt {index} of the prompts file; "
                             "was the prompts file changed? (write answers for new prompts to a new file)")
        if index in answered:
            raise ValueError(f"{source}:meta.prompt_index: prompt {index} is also answered at {answered[index]}")
        answered[index] = source
    return answered


def _answered(out: pathlib.Path, prompts: Sequence[str], seed: int) -> set[int]:
    decided, undecided = _recorded(out, prompts, seed), _recorded(undecided_path(out), prompts, seed)
    both = sorted(decided.keys() & undecided.keys())
    if both:
        raise ValueError(f"{undecided[both[0]]}:meta.prompt_index: prompt {both[0]} is also answered at {decided[both[0]]}")
    return decided.keys() | undecided.keys()


class _AppendLog:
    """An append-only JSON Lines file: each record is on disk (fsync) when ``write`` returns."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        self._file = open(path, "ab")
        if created:  # make the new directory entry durable too
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _ask(question: str, options: dict[str, Any], stdin: IO[str], stdout: IO[str]) -> tuple[bool, Any]:
    """``(True, options[answer])``, asking again until the answer is an option; ``(False, None)`` on EOF or ``q``."""
    while True:
        stdout.write(question)
        stdout.flush()
        line = stdin.readline()
        answer = line.strip().lower()
        if not line or answer == "q":
            return False, None
        if answer in options:
            return True, options[answer]
        stdout.write(f"  please type one of {', '.join(options)} (or q to quit)\n")


@dataclasses.dataclass(frozen=True)
class Session:
    """What one run of ``collect`` did."""

    total: int
    """Prompts in the file."""
    answered_before: int
    """Prompts already answered when the run started."""
    answered_now: int
    """Answers recorded by this run."""

    @property
    def remaining(self) -> int:
        return self.total - self.answered_before - self.answered_now


def collect(prompts: Sequence[str], out: str | os.PathLike, sampler: Sampler, *, seed: int = 0, thumbs: bool = False,
            stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> Session:
    """Ask for a comparison of two sampled responses per unanswered prompt, recording each answer.

    Stops at the end of the prompts, at ``q`` or at end of input; file layout and restart rules
    are in the module docstring.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    out = pathlib.Path(out)
    done = _answered(out, prompts, seed)
    todo = [i for i in range(len(prompts)) if i not in done]
    stdout.write(f"{len(done)} of {len(prompts)} prompts answered; {len(todo)} to go.\n")
    logs = {"decided": _AppendLog(out), "undecided": _AppendLog(undecided_path(out))}
    recorded = 0
    try:
        for index in todo:
            responses = sampler(prompts[index], seed, index)
            comparable = len(set(responses)) == 2 and all(r.strip() for r in responses)
            stdout.write(f"\n=== prompt {index + 1} of {len(prompts)} ===\n{prompts[index]}\n")
            for n, response in enumerate(responses, start=1):
                stdout.write(f"--- response {n} ---\n{response if response.strip() else '<empty>'}\n")
            if comparable:
                ok, choice = _ask("Better response? 1 / 2 / t(ie) / s(kip): ", CHOICES, stdin, stdout)
            else:
                stdout.write("(the responses are identical or empty: only a tie or a skip can be recorded)\n")
                ok, choice = _ask("t(ie) / s(kip): ", {"t": "tie", "s": "skip"}, stdin, stdout)
            if not ok:
                break
            meta: dict[str, Any] = {"prompt_index": index, "choice": choice, "seed": seed}
            if thumbs:
                meta["thumbs"] = []
                for n in (1, 2):
                    ok, thumb = _ask(f"Response {n}: thumb u(p) / d(own) / - (no opinion): ", THUMBS, stdin, stdout)
                    if not ok:
                        break
                    meta["thumbs"].append(thumb)
                if not ok:
                    break
            if choice in ("1", "2"):
                chosen = responses[int(choice) - 1]
                rejected = responses[2 - int(choice)]
                logs["decided"].write({"prompt": prompts[index], "chosen": chosen, "rejected": rejected, "meta": meta})
            else:
                logs["undecided"].write({"prompt": prompts[index], "responses": list(responses), "meta": meta})
            recorded += 1
    finally:
        for log in logs.values():
            log.close()
    session = Session(len(prompts), len(done), recorded)
    stdout.write(f"\nrecorded {recorded} answers this session; {session.remaining} prompts left.\n")
    return session
