"""Held-out evaluation of a policy against its reference, shared by PPO, DPO and best-of-n.

One function, :func:`compare`, turns the samples of a policy and of the reference on the same
held-out prompts into the figures every method reports:

- ``kl``: Monte-Carlo KL(π ‖ π_ref) per sequence (or the closed form, for best-of-n);
- ``response_tokens`` / ``ref_response_tokens``: mean response length in tokens (EOS counted);
- ``eos_rate`` / ``ref_eos_rate``: share of responses that ended with EOS before the length limit;
- ``rm_score`` / ``ref_rm_score`` / ``rm_win_rate``: the reward model's mean score and its preference
  rate for the policy's response over the reference's (when a reward model is given);
- ``gold`` / ``ref_gold`` / ``win_rate``: the same judged by the simulated annotator's gold scorer
  (embedded default only);
- ``samples``: the first few prompts with both responses and their scores;
- ``per_prompt`` (with the gold scorer): every prompt and both gold scores, for comparing a third model
  sampled on the same prompts (the pipeline's win rates against the starting model).

:func:`evaluate_policy` samples both models with fixed keys (``seed`` for the policy, ``seed + 1``
for the reference), so every method evaluated with the same seed, prompts and sampling settings is
compared with the *same* reference samples. Samples tables are written with :func:`samples_table`,
whose cells survive any prompt (text or conversation) and any response.
"""
from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from rlhf_jax import ensemble, kl, models, objectives, ops, rollout

NUM_SAMPLES_SHOWN = 8
"""Prompts whose responses are kept in ``samples`` (eval.json, samples.md)."""


# --- Rendering prompts and responses ------------------------------------------------------------


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: text as is; a conversation (``Message``s or ``{role, content}``
    dicts) as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for m in prompt:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else (m.role, m.content)
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


def jsonable_prompt(prompt: Any) -> str | list[dict[str, str]]:
    """A prompt in the data files' JSON form: text, or a list of ``{role, content}`` messages."""
    if isinstance(prompt, str):
        return prompt
    return [dict(m) if isinstance(m, Mapping) else dataclasses.asdict(m) for m in prompt]


_MARKDOWN_SPECIAL = "\\`*_[]~|"  # inline syntax that can act inside a table cell (escaped with a backslash)


def markdown_cell(value: Any, *, max_chars: int = 300) -> str:
    """``value`` (text, a conversation, a number) as one Markdown (GFM) table cell that renders as the text.

    The text is cut to ``max_chars`` characters, and a cut says so (``… (cut: 1234 chars)``);
    ``&``, ``<`` and ``>`` become HTML entities (a prompt's ``<|im_start|>`` is not taken for a
    tag), ``|`` and the other inline syntax characters are backslash-escaped, newlines become
    ``<br>``, tabs spaces, and an empty text shows as ``(empty)``. Floats are shown to 3 decimals.
    """
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    text = str(value) if isinstance(value, (int, np.integer)) else prompt_text(value)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    suffix = ""
    if len(text) > max_chars:
        suffix = f" … (cut: {len(text)} chars)"
        text = text[:max_chars]
    text = text.strip()
    if not text:
        return "(empty)" + suffix
    text = html.escape(text, quote=False)
    text = "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in text)
    return text.replace("\n", "<br>") + suffix


def samples_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], *,
                  max_chars: int = 300) -> str:
    """A Markdown table of ``rows``: ``columns`` is ``(header, key)`` pairs; a missing key is blank."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(markdown_cell(r[k], max_chars=max_chars) if r.get(k) is not None else ""
                              for _, k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def comparison_table(result: Mapping[str, Any], *, policy: str = "policy", reference: str = "reference",
                     max_rows: int = NUM_SAMPLES_SHOWN) -> str:
    """The samples of a :func:`compare` result as a table: prompt, both responses and their scores."""
    samples = list(result.get("samples", []))[:max_rows]
    columns = [("prompt", "prompt"), (reference, "reference"), (policy, "response")]
    for key, header in (("ref_rm", f"RM ({reference})"), ("rm", f"RM ({policy})"),
                        ("ref_gold", f"gold ({reference})"), ("gold", f"gold ({policy})")):
        if any(key in s for s in samples):
            columns.append((header, key))
    return samples_table(samples, columns)


def open_samples_file(path: Any, *, resume_from: int | None):
    """``samples.md`` opened for appending sections headed ``## iteration N ...`` / ``## step N ...``.

    ``resume_from`` as in :class:`rlhf_jax.logging.MetricsLogger`: sections of an earlier run past
    that step are removed first (0: a fresh run starts the file anew); ``None`` only appends.
    """
    import pathlib
    import re

    path = pathlib.Path(path)
    if resume_from is not None and path.exists():
        kept, keep = [], True
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            header = re.match(r"## (?:iteration|step) (\d+)\b", line)
            if header:
                keep = int(header.group(1)) <= resume_from
            if keep:
                kept.append(line)
        path.write_text("".join(kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")


# --- Samples of one model on the evaluation prompts ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Samples:
    """One response per evaluation prompt, with what the figures need."""

    texts: list[str]
    """Decoded response (EOS removed)."""
    tokens: np.ndarray
    """Response tokens, EOS included, int (N,)."""
    has_eos: np.ndarray
    """The response ended with EOS, bool (N,)."""
    rm_scores: np.ndarray | None = None
    """Reward-model score of prompt + response (None without a reward model)."""

    @staticmethod
    def from_rollouts(texts: Sequence[str], rollouts: Sequence[rollout.Rollout], rm_scores: np.ndarray | None = None
                      ) -> "Samples":
        """``texts`` (one per prompt) and the rollouts they came from (rows beyond ``len(texts)`` pad
        the last batch and are dropped)."""
        n = len(texts)
        lengths = np.concatenate([np.asarray(jax.device_get(r.lengths_B)) for r in rollouts])[:n]
        eos = np.concatenate([np.asarray(jax.device_get(r.has_eos_B)) for r in rollouts])[:n]
        return Samples(list(texts), lengths, eos.astype(bool), None if rm_scores is None else np.asarray(rm_scores)[:n])

    def take(self, index: np.ndarray) -> "Samples":
        """Rows ``index`` (e.g. the chosen one of every group of best-of-n samples)."""
        index = np.asarray(index)
        return Samples([self.texts[i] for i in index], self.tokens[index], self.has_eos[index],
                       None if self.rm_scores is None else self.rm_scores[index])


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A reward model to judge samples with: its config and ``{"backbone", "head"}`` params, or a
    :class:`rlhf_jax.ensemble.RewardEnsemble` (members stacked, scores combined by its rule)."""

    cfg: models.ModelConfig
    params: Any


def load_reward_model(path: Any, model_args: Any, tokenizer: Any, *, rule: str = "mean", uwo_lambda: float = 0.0
                      ) -> RewardModel:
    """The reward model at ``path`` (``model_io.save_reward_model``'s layout) as a judge of samples
    tokenized by ``tokenizer``; an error names both when their vocabularies differ. A sequence of paths
    loads an ensemble (:func:`rlhf_jax.ensemble.load`) whose scores ``rule`` combines (with ``uwo_lambda``)."""
    from rlhf_jax import ensemble, model_io

    if isinstance(path, (str, os.PathLike)):
        cfg, params, rm_tokenizer = model_io.load_reward_model(path, model_args)
    else:
        cfg, params, rm_tokenizer = ensemble.load(path, model_args, rule=rule, uwo_lambda=uwo_lambda)
        path = ", ".join(map(str, path))
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reward model {path} has another tokenizer than the policy ({len(rm_tokenizer)} vs "
                         f"{len(tokenizer)} tokens): it cannot score the policy's token ids")
    return RewardModel(cfg, params)


def sample_model(cfg: models.ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[Any], *, key: jax.Array,
                 sample_args: Any, reward: RewardModel | None = None, num_samples: int = 1, mesh=None, rules=None
                 ) -> tuple[Samples, list[rollout.Rollout]]:
    """Sample ``num_samples`` responses per prompt (rows prompt-major) and score them with ``reward``."""
    from rlhf_jax import sampling

    texts, rollouts = sampling.sample(cfg, params, tokenizer, prompts, key=key, sample_args=sample_args,
                                      num_samples=num_samples, mesh=mesh, rules=rules)
    flat = [t for per_prompt in texts for t in per_prompt]
    scores = None if reward is None else rm_scores(reward.cfg, reward.params, rollouts)
    return Samples.from_rollouts(flat, rollouts, scores), rollouts


# --- The figures -----------------------------------------------------------------------------


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """P(a > b) + ½ P(a = b) over paired samples (the judge's preference rate for a)."""
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def compare(prompts: Sequence[Any], policy: Samples, reference: Samples, *, kl: np.ndarray | float,
            gold: bool = False, num_shown: int = NUM_SAMPLES_SHOWN) -> dict[str, Any]:
    """The evaluation figures of ``policy`` against ``reference`` on ``prompts`` (see the module docstring).

    ``kl`` is per-prompt (its mean is reported) or one number (best-of-n's closed form). ``gold``
    judges with the simulated annotator's gold scorer (text prompts of the embedded default only).
    """
    n = len(prompts)
    if not (len(policy.texts) == len(reference.texts) == n):
        raise ValueError(f"compare: {n} prompts, {len(policy.texts)} policy and {len(reference.texts)} reference responses")
    if n == 0:
        raise ValueError("compare: no evaluation prompts")
    out: dict[str, Any] = {"num_prompts": n}
    per_sample: dict[str, np.ndarray] = {}
    if gold:
        from rlhf_jax.data.simulated import gold_scores

        g, rg = gold_scores(list(prompts), policy.texts), gold_scores(list(prompts), reference.texts)
        out.update(gold=float(g.mean()), ref_gold=float(rg.mean()), win_rate=win_rate(g, rg))
        per_sample.update(gold=g, ref_gold=rg)
        # every prompt's gold scores, so a third model sampled on the same prompts can be compared later
        out["per_prompt"] = {"prompts": [jsonable_prompt(p) for p in prompts], "gold": g.tolist(), "ref_gold": rg.tolist()}
    out["kl"] = float(np.mean(kl))
    if policy.rm_scores is not None and reference.rm_scores is not None:
        out.update(rm_score=float(policy.rm_scores.mean()), ref_rm_score=float(reference.rm_scores.mean()),
                   rm_win_rate=win_rate(policy.rm_scores, reference.rm_scores))
        per_sample.update(rm=policy.rm_scores, ref_rm=reference.rm_scores)
    out.update(response_tokens=float(policy.tokens.mean()), ref_response_tokens=float(reference.tokens.mean()),
               eos_rate=float(policy.has_eos.mean()), ref_eos_rate=float(reference.has_eos.mean()),
               response_words=float(np.mean([len(r.split()) for r in policy.texts])))
    samples = []
    for i in range(min(num_shown, n)):
        s = {"prompt": jsonable_prompt(prompts[i]), "response": policy.texts[i], "reference": reference.texts[i]}
        s.update({k: float(v[i]) for k, v in per_sample.items()})
        samples.append(s)
    out["samples"] = samples
    return out


def evaluate_policy(cfg: models.ModelConfig, params: Any, ref_params: Any, tokenizer: Any, prompts: Sequence[Any], *,
                    seed: int, sample_args: Any, reward: RewardModel | None = None, gold: bool = False,
                    mesh=None, rules=None, reference_memo: dict | None = None) -> dict[str, Any]:
    """Sample the policy (key ``seed``) and the reference (key ``seed + 1``) on the same held-out
    prompts and :func:`compare` them, with the Monte-Carlo KL(π ‖ π_ref) of the policy's samples.

    ``reference_memo``: a dict the caller keeps across the evaluations of one run whose reference, prompts,
    seed, sampling arguments and reward model never change (a frozen reference): the reference's samples and
    scores are computed at the first call, stored in it, and reused (the same values, without sampling them again).
    """

    policy, rollouts = sample_model(cfg, params, tokenizer, prompts, key=jax.random.key(seed), sample_args=sample_args,
                                    reward=reward, mesh=mesh, rules=rules)
    if reference_memo is not None and "reference" in reference_memo:
        reference = reference_memo["reference"]
    else:
        reference, _ = sample_model(cfg, ref_params, tokenizer, prompts, key=jax.random.key(seed + 1),
                                    sample_args=sample_args, reward=reward, mesh=mesh, rules=rules)
        if reference_memo is not None:
            reference_memo["reference"] = reference
    kl = kl_to_reference(cfg, params, ref_params, rollouts)[:len(prompts)]
    return compare(prompts, policy, reference, kl=kl, gold=gold)


def scalars(result: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numeric figures of a :func:`compare` result, keys prefixed (for the metrics logger)."""
    return {f"{prefix}{k}": float(v) for k, v in result.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}  # (per_prompt is a dict: skipped)


PRINT_KEYS = ("eval/rm_score", "eval/rm_win_rate", "eval/gold", "eval/win_rate", "eval/kl", "eval/response_tokens",
              "eval/eos_rate")
"""The figures of :func:`scalars` shown on the console line of an evaluation."""


def summary(result: Mapping[str, Any]) -> str:
    """One console line of the main figures."""
    parts = []
    if "gold" in result:
        parts.append(f"gold {result['gold']:.3f} (reference {result['ref_gold']:.3f}), win rate {result['win_rate']:.3f}")
    if "rm_score" in result:
        parts.append(f"RM {result['rm_score']:.3f} (reference {result['ref_rm_score']:.3f}), "
                     f"RM win rate {result['rm_win_rate']:.3f}")
    parts.append(f"KL {result['kl']:.2f}, {result['response_tokens']:.1f} tokens, EOS {result['eos_rate']:.0%}"
                 f" on {result['num_prompts']} held-out prompts")
    return "; ".join(parts)


# --- Scores and KL of sampled rollouts --------------------------------------------------------------

_token_logps = jax.jit(objectives.token_logps, static_argnums=0)  # compiled once per (cfg, shapes), reused by every call


def _combined_rm_scores(cfg: models.ModelConfig, rm_params: Any, ids_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return ensemble.score(cfg, rm_params, ids_BT, mask_BT)[0]  # one reward model: objectives.reward_scores itself


_reward_scores = jax.jit(_combined_rm_scores, static_argnums=0)
_member_scores = jax.jit(ensemble.member_scores, static_argnums=0)


def kl_to_reference(cfg: models.ModelConfig, params: Any, ref_params: Any, rollouts: Sequence[rollout.Rollout]
                    ) -> np.ndarray:
    """Monte-Carlo KL(π ‖ π_ref) per sampled sequence: Σ_t log π(y_t) − log π_ref(y_t) (k1, unbiased
    for the sequence KL when the samples come from π at temperature 1)."""
    out = []
    for r in rollouts:
        kl_BT = kl.kl_k1(_token_logps(cfg, params, r.sequences_BT, r.attention_mask_BT),
                         _token_logps(cfg, ref_params, r.sequences_BT, r.attention_mask_BT))
        out.append(np.asarray(ops.masked_sum(kl_BT, r.scored_mask_BT, axis=-1)))
    return np.concatenate(out)


def gold_eval(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Gold scores from the simulated annotator's scorer (embedded default only)."""
    from rlhf_jax.data.simulated import gold_scores

    return gold_scores(list(prompts), list(responses))


def rm_scores(cfg: models.ModelConfig, rm_params: Any, rollouts: Sequence[rollout.Rollout]) -> np.ndarray:
    """Reward-model score of every sampled sequence (last real token); with an ensemble
    (:class:`rlhf_jax.ensemble.RewardEnsemble`), its members' scores combined by its rule."""
    return np.concatenate([np.asarray(_reward_scores(cfg, rm_params, r.sequences_BT, r.attention_mask_BT)) for r in rollouts])


def rm_member_scores(cfg: models.ModelConfig, rm_params: Any, rollouts: Sequence[rollout.Rollout]) -> np.ndarray:
    """Every member's score of every sampled sequence, ``(K, rows)``: an ensemble's members (before its rule
    combines them), or one row for a single reward model."""
    from rlhf_jax.ensemble import RewardEnsemble

    if not isinstance(rm_params, RewardEnsemble):
        return rm_scores(cfg, rm_params, rollouts)[None]
    return np.concatenate([np.asarray(_member_scores(cfg, rm_params.params, r.sequences_BT, r.attention_mask_BT))
                           for r in rollouts], axis=1)


def find_reward_model(stage: str, run_out: str, reward_model: str | None, model_args: Any, tokenizer: Any
                      ) -> RewardModel | None:
    """``reward_model``, else ``<run_out>/rm/hf`` when it exists, else None: the judge of an offline stage's samples."""
    import pathlib

    from rlhf_jax.model_io import REWARD_HEAD_FILE

    rm_path = pathlib.Path(reward_model or pathlib.Path(run_out) / "rm" / "hf")
    if reward_model is None and not (rm_path / REWARD_HEAD_FILE).exists():
        return None
    print(f"[{stage}] held-out samples judged by the reward model {rm_path}", flush=True)
    return load_reward_model(rm_path, model_args, tokenizer)


def evaluate_trained_policy(*, stage: str, name: str, out: Any, step: int, model_cfg: models.ModelConfig, policy: Any,
                            reference: Any, tokenizer: Any, prompts: Sequence[Any], run_out: str, model_args: Any,
                            reward_model: str | None, sample_args: Any, gold: bool, seed: int, mesh=None,
                            rules=None, reference_memo: dict | None = None) -> dict:
    """The end-of-training evaluation of an offline policy stage (DPO family, KTO): :func:`evaluate_policy`
    on ``prompts``, judged by ``reward_model`` (or ``<run_out>/rm/hf`` when it exists) and, with ``gold``, the
    gold scorer; logged at ``step`` in ``out``'s metrics, written to ``out/samples.md`` and printed.
    ``reference_memo``: as in :func:`evaluate_policy` (the run's earlier evaluations of the same reference)."""
    from rlhf_jax.logging import MetricsLogger

    reward = find_reward_model(stage, run_out, reward_model, model_args, tokenizer)
    ev = evaluate_policy(model_cfg, policy, reference, tokenizer, prompts, seed=seed, sample_args=sample_args,
                         reward=reward, gold=gold, mesh=mesh, rules=rules, reference_memo=reference_memo)
    table = comparison_table(ev, policy=name, reference="SFT")
    with MetricsLogger(out, stage=stage) as logger:  # appended after the training loop's entries
        logger.log(step, scalars(ev), print_keys=PRINT_KEYS)
        logger.text(step, "eval_samples", table)
    with open_samples_file(out / "samples.md", resume_from=0) as samples_md:
        samples_md.write(f"## step {step} (held-out evaluation)\n\n{table}\n")
    print(f"[{stage}] {summary(ev)}", flush=True)
    return ev
