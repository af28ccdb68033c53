"""``python -m rlhf_jax.feedback.web``: a web app where annotators compare, rank and thumb responses.

    # accounts (the token is printed once; only its hash is stored)
    python -m rlhf_jax.feedback.web add-annotator --db feedback.db --name admin --admin
    python -m rlhf_jax.feedback.web add-annotator --db feedback.db --name alice
    # serve the policy's own samples (drawn in the background, ahead of the annotators) ...
    python -m rlhf_jax.feedback.web serve --db feedback.db --policy runs/default/ppo/hf --prompts prompts.jsonl \
        --tasks pairwise ranked thumbs --overlap 2
    # ... or a file of candidates {"prompt", "responses": [...]}
    python -m rlhf_jax.feedback.web serve --db feedback.db --candidates candidates.jsonl --tasks pairwise
    # training rows and agreement statistics
    python -m rlhf_jax.feedback.web export --db feedback.db --out feedback/
    python experiments/reward_model.py --data.path feedback/pairwise.jsonl --data.eval-fraction 0.1

Annotators open ``http://127.0.0.1:8000/``, paste their token and answer with the keyboard or the
mouse; ``/admin`` shows progress, agreement and the exports. The database is the one source of truth:
stop and restart the server at any time (``serve`` again with the same ``--db``), nothing answered is
lost or asked again. Binds 127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Annotated, Literal

import tyro

from rlhf_jax.feedback.store import Store

Task = Literal["pairwise", "ranked", "thumbs"]


@dataclasses.dataclass(frozen=True)
class Serve:
    """Serve the annotation app."""

    db: pathlib.Path
    """SQLite database (created if missing; WAL files beside it)."""
    policy: str | None = None
    """Policy checkpoint (Hugging Face layout) to sample responses from, in the background. Needs --prompts."""
    candidates: pathlib.Path | None = None
    """Instead of a policy: JSON Lines / Parquet rows {"prompt", "responses": [text, ...]}."""
    prompts: str | None = None
    """With --policy: JSON Lines / Parquet rows {"prompt": text or conversation}, or simulated:N (the embedded
    default's simulated task)."""
    tasks: tuple[Task, ...] = ("pairwise",)
    """Task kinds; with several, consecutive prompts alternate between them."""
    ranking_size: int = 4
    """K, the responses of a ranked item."""
    overlap: int | None = None
    """Annotators per item (each item goes to this many, never twice to one). Fixed when the database is
    created (default 1); later runs read it from the database."""
    gold: str | None = None
    """A gold judge, module:function (a reward function, e.g. rlhf_jax.rewards:gold for the embedded default):
    the admin report gives agreement with it."""
    host: str = "127.0.0.1"
    """Interface to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port."""
    ahead: int = 32
    """With --policy: keep this many items sampled ahead of the annotators."""
    seed: int = 0
    """Sampling seed."""
    max_new_tokens: int = 128
    """With --policy: response length limit (tokens)."""
    temperature: float = 1.0
    """With --policy: sampling temperature."""
    top_p: float | None = None
    """With --policy: nucleus threshold (None = off)."""
    batch_size: int = 16
    """With --policy: prompts per generate call."""
    lease_s: float = 3600.0
    """An item handed out and left unanswered this long stops counting against its overlap."""


@dataclasses.dataclass(frozen=True)
class AddAnnotator:
    """Create an annotator account and print its secret token (once)."""

    db: pathlib.Path
    """SQLite database (created if missing)."""
    name: str
    """Annotator name (letters, digits, - _ .)."""
    admin: bool = False
    """An admin sees everyone's answers, the agreement report and the exports."""


@dataclasses.dataclass(frozen=True)
class Export:
    """Write pairwise.jsonl, ranked.jsonl, binary.jsonl and agreement.json."""

    db: pathlib.Path
    """SQLite database."""
    out: pathlib.Path
    """Directory to write into."""


Command = (Annotated[Serve, tyro.conf.subcommand("serve")] | Annotated[AddAnnotator, tyro.conf.subcommand("add-annotator")]
           | Annotated[Export, tyro.conf.subcommand("export")])


def _existing(db: pathlib.Path) -> Store:
    if not db.exists():
        raise FileNotFoundError(f"{db}: no such database")
    return Store(db)


def serve(cmd: Serve) -> int:
    import uvicorn

    from rlhf_jax.feedback import items as item_sources
    from rlhf_jax.feedback.server import create_app

    if (cmd.policy is None) == (cmd.candidates is None):
        raise ValueError("give exactly one of --policy (sample responses) or --candidates (a file of responses)")
    if cmd.policy is not None and cmd.prompts is None:
        raise ValueError("--policy needs --prompts (a file of {\"prompt\"} rows, or simulated:N)")
    if cmd.candidates is not None and cmd.prompts is not None:
        raise ValueError("--prompts goes with --policy; a --candidates file holds its own prompts")
    item_sources.check_tasks(cmd.tasks, cmd.ranking_size)
    store = Store(cmd.db, overlap=cmd.overlap, lease_s=cmd.lease_s, fix_overlap=True)
    gold = None
    if cmd.gold is not None:
        from rlhf_jax import rewards

        gold = rewards.load(cmd.gold).fn
    sampler = None
    if cmd.candidates is not None:
        new = store.add_items(item_sources.read_candidates(cmd.candidates, cmd.tasks, cmd.ranking_size, gold))
        print(f"[feedback] {cmd.candidates}: {new} new items", flush=True)
    else:
        sampler = item_sources.PolicySampler(
            store, cmd.policy, item_sources.read_prompts(cmd.prompts), tasks=cmd.tasks, ranking_size=cmd.ranking_size,
            gold=gold, ahead=cmd.ahead, seed=cmd.seed, max_new_tokens=cmd.max_new_tokens, temperature=cmd.temperature,
            top_p=cmd.top_p, batch_size=cmd.batch_size).start()
    if not store.annotators():
        print(f"[feedback] {cmd.db} has no annotators yet: python -m rlhf_jax.feedback.web add-annotator "
              f"--db {cmd.db} --name NAME [--admin]", flush=True)
    print(f"[feedback] serving http://{cmd.host}:{cmd.port}/ (overlap {store.overlap}; database {cmd.db})", flush=True)
    app = create_app(store, status=sampler.status if sampler is not None else None)
    try:
        uvicorn.run(app, host=cmd.host, port=cmd.port, log_level="warning")
    finally:
        if sampler is not None:
            sampler.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    cmd = tyro.cli(Command, args=argv)
    if isinstance(cmd, Serve):
        return serve(cmd)
    if isinstance(cmd, AddAnnotator):
        token = Store(cmd.db).add_annotator(cmd.name, admin=cmd.admin)
        print(f"{cmd.name}{' (admin)' if cmd.admin else ''}: {token}")
        print("keep this token: only its hash is stored", file=sys.stderr)
        return 0
    from rlhf_jax.feedback import export

    written = export.export(_existing(cmd.db), cmd.out)
    print(json.dumps({"out": str(cmd.out), "written": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
