"""rlhf_jax.evaluation and the held-out split: Markdown cells checked by a GFM renderer nobody here
wrote (markdown-it-py's table extension), the figures against plain loops, the split's invariants,
and the logged learning rate against the updates optax actually applies."""
from __future__ import annotations

import html.parser
import json

import numpy as np
import pytest

from rlhf_jax import cli, evaluation
from rlhf_jax.data import sources
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import Message, PairRow, PromptRow


class _Cells(html.parser.HTMLParser):
    """Rows of table cells in rendered HTML, with <br> read back as a newline."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")
        elif self._cell is not None:
            raise AssertionError(f"markup leaked into a cell: <{tag}>")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def render_table(markdown: str) -> list[list[str]]:
    import markdown_it

    parser = _Cells()
    parser.feed(markdown_it.MarkdownIt("commonmark").enable("table").render(markdown))
    return parser.rows


NASTY = ["a | b", " leading space", "two\nlines\r\nand\rmore", "*bold* _it_ `code` [link](x) ~~s~~", "<|im_start|>user",
         "&amp; & <br> \\ back\\slash \\| escaped", "tab\there", "", "   ", "trailing backslash \\"]


def _expected(text: str, max_chars: int) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    cut = len(text) > max_chars
    shown = text[:max_chars].strip() or "(empty)"
    return shown + (f" … (cut: {len(text)} chars)" if cut else "")


def test_samples_table_renders_every_text_verbatim_in_its_cell():
    rng = np.random.default_rng(0)
    alphabet = list("ab |*_`[]~<>&\\\n\t#-!()") + ["<br>", "&lt;", "\r\n"]
    texts = NASTY + ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(60)]
    rows = [{"prompt": t, "response": texts[-1 - i], "score": float(i) / 7} for i, t in enumerate(texts)]
    table = evaluation.samples_table(rows, [("prompt", "prompt"), ("response", "response"), ("score", "score")],
                                     max_chars=25)
    cells = render_table(table)
    assert cells[0] == ["prompt", "response", "score"]
    assert len(cells) == len(rows) + 1
    for row, got in zip(rows, cells[1:]):
        assert got == [_expected(row["prompt"], 25), _expected(row["response"], 25), f"{row['score']:.3f}"]


def test_conversation_prompts_render_as_role_lines():
    conversation = (Message("user", "Hi | there\nsecond line"), Message("assistant", "Hello."), Message("user", "Bye"))
    as_dicts = [{"role": m.role, "content": m.content} for m in conversation]
    cells = render_table(evaluation.samples_table([{"p": conversation}, {"p": as_dicts}], [("prompt", "p")]))
    want = "user: Hi | there\nsecond line\nassistant: Hello.\nuser: Bye"
    assert cells[1] == [want] and cells[2] == [want]
    assert evaluation.jsonable_prompt(conversation) == as_dicts


def test_cut_cells_say_so():
    cell = evaluation.markdown_cell("x" * 1000, max_chars=10)
    assert cell == "xxxxxxxxxx … (cut: 1000 chars)"
    assert evaluation.markdown_cell("x" * 10, max_chars=10) == "x" * 10


# --- The figures ------------------------------------------------------------------------------


def _samples(rng, n, *, rm=True):
    return evaluation.Samples(texts=[" ".join(["w"] * int(k)) for k in rng.integers(0, 6, n)],
                              tokens=rng.integers(1, 20, n), has_eos=rng.random(n) < 0.7,
                              rm_scores=np.round(rng.normal(size=n), 1) if rm else None)


def test_compare_figures_equal_plain_loops():
    rng = np.random.default_rng(3)
    n = 40
    prompts = [f"p{i}" if i % 2 else (Message("user", f"q{i}"),) for i in range(n)]
    policy, reference = _samples(rng, n), _samples(rng, n)
    kl = rng.normal(size=n)
    out = evaluation.compare(prompts, policy, reference, kl=kl, num_shown=5)
    wins = 0.0
    for a, b in zip(policy.rm_scores, reference.rm_scores):  # ties (scores rounded to 0.1) count one half
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
    assert out["rm_win_rate"] == pytest.approx(wins / n)
    assert out["rm_score"] == pytest.approx(sum(policy.rm_scores) / n)
    assert out["ref_rm_score"] == pytest.approx(sum(reference.rm_scores) / n)
    assert out["kl"] == pytest.approx(sum(kl) / n)
    assert out["response_tokens"] == pytest.approx(sum(policy.tokens) / n)
    assert out["ref_response_tokens"] == pytest.approx(sum(reference.tokens) / n)
    assert out["eos_rate"] == pytest.approx(sum(policy.has_eos) / n)
    assert out["ref_eos_rate"] == pytest.approx(sum(reference.has_eos) / n)
    assert out["num_prompts"] == n and "gold" not in out and "win_rate" not in out
    assert len(out["samples"]) == 5 and out["samples"][0]["prompt"] == [{"role": "user", "content": "q0"}]
    assert out["samples"][1]["rm"] == policy.rm_scores[1] and out["samples"][1]["ref_rm"] == reference.rm_scores[1]
    json.dumps(out)  # eval.json takes it as is (conversation prompts included)
    scalars = evaluation.scalars(out)
    assert scalars["eval/rm_win_rate"] == out["rm_win_rate"] and "eval/samples" not in scalars


def test_compare_without_reward_model_or_gold_reports_kl_length_eos():
    rng = np.random.default_rng(4)
    out = evaluation.compare(["a", "b", "c"], _samples(rng, 3, rm=False), _samples(rng, 3, rm=False), kl=0.5)
    assert {"kl", "response_tokens", "eos_rate", "ref_eos_rate", "samples"} <= set(out)
    assert not {"rm_score", "rm_win_rate", "gold", "win_rate"} & set(out)
    assert out["kl"] == 0.5
    with pytest.raises(ValueError, match="3 prompts, 2 policy"):
        evaluation.compare(["a", "b", "c"], _samples(rng, 2), _samples(rng, 3), kl=0.0)


def test_gold_judge_on_simulated_prompts():
    from rlhf_jax.data.simulated import gold_scores

    rng = np.random.default_rng(5)
    prompts = ["Customer: Hi. My order 1234 has not arrived.\nAgent:"] * 3
    policy = evaluation.Samples([" I'm sorry. Your order ships today.", " Okay.", " Hello."], np.ones(3, int),
                                np.ones(3, bool))
    reference = evaluation.Samples([" Okay.", " Okay.", " I'm sorry about this, happy to help."], np.ones(3, int),
                                   np.ones(3, bool))
    out = evaluation.compare(prompts, policy, reference, kl=0.0, gold=True)
    g, rg = gold_scores(prompts, policy.texts), gold_scores(prompts, reference.texts)
    assert out["gold"] == pytest.approx(g.mean()) and out["ref_gold"] == pytest.approx(rg.mean())
    assert out["win_rate"] == pytest.approx(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(g, rg)]))
    del rng


def test_take_picks_rows():
    s = evaluation.Samples(["a", "b", "c", "d"], np.array([1, 2, 3, 4]), np.array([1, 0, 1, 0], bool),
                           np.array([0.1, 0.2, 0.3, 0.4]))
    t = s.take(np.array([3, 0]))
    assert t.texts == ["d", "a"] and list(t.tokens) == [4, 1] and list(t.has_eos) == [False, True]
    assert list(t.rm_scores) == [0.4, 0.1]


# --- Held-out split ---------------------------------------------------------------------------


def _rows(n_prompts: int, repeats: int = 2) -> list[PairRow]:
    rows = []
    for i in range(n_prompts):
        prompt = f"prompt {i}" if i % 3 else (Message("user", f"conversation {i}"),)
        rows += [PairRow(prompt=prompt, chosen=f"c{i}.{j}", rejected=f"r{i}.{j}") for j in range(repeats)]
    return rows


def test_split_holds_out_whole_prompts_independently_of_order():
    rows = _rows(400)
    train, held = sources.split_held_out(rows, 0.1)
    train_prompts, held_prompts = {sources._prompt_key(r.prompt) for r in train}, {sources._prompt_key(r.prompt) for r in held}
    assert not train_prompts & held_prompts
    assert len(train) + len(held) == len(rows)
    assert 20 <= len(held_prompts) <= 60  # about 10% of 400
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    _, held_shuffled = sources.split_held_out(shuffled, 0.1)
    assert set(held_shuffled) == set(held)  # a prompt is held out wherever it appears
    _, held_more = sources.split_held_out(rows, 0.3)
    assert set(held) <= set(held_more)
    assert sources.split_held_out(rows, 0.0) == (rows, [])


def test_split_of_tiny_files():
    two = _rows(2, repeats=1)
    train, held = sources.split_held_out(two, 0.05)
    assert len(train) == 1 and len(held) == 1
    train, held = sources.split_held_out(two, 0.99)
    assert len(train) == 1 and len(held) == 1
    one = _rows(1, repeats=3)
    assert sources.split_held_out(one, 0.5) == (one, [])


def test_rows_from_a_user_file_splits_and_says_so(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"text prompt {i}"} if i % 2 else {"prompt": [{"role": "user", "content": f"chat {i}"}]}
             for i in range(60)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = cli.DataArgs(path=str(path), eval_fraction=0.2)
    train = sources.rows_from(data, "prompt", "train", None)
    held = sources.rows_from(data, "prompt", "eval", None)
    assert all(isinstance(r, PromptRow) for r in train + held)
    assert len(train) + len(held) == 60 and held and not set(train) & set(held)
    printed = capsys.readouterr().out
    assert printed.count("held out for evaluation") == 1 and "--data.eval-fraction 0.2" in printed
    with_file = cli.DataArgs(path=str(path), eval_path=str(path))
    assert len(sources.rows_from(with_file, "prompt", "train", None)) == 60  # an eval file: no split
    with pytest.raises(ValueError, match="eval-fraction"):
        cli.DataArgs(eval_fraction=1.0)


def test_eval_prompts_are_distinct_in_order():
    rows = _rows(5, repeats=3)
    prompts = sources.eval_prompts(rows, 4)
    assert prompts == [rows[0].prompt, rows[3].prompt, rows[6].prompt, rows[9].prompt]


# --- Learning rate ----------------------------------------------------------------------------


@pytest.mark.parametrize("accum", [1, 3])
def test_logged_learning_rate_is_the_step_size_adam_applied(accum):
    """With a constant gradient every Adam update moves a parameter by exactly the learning rate
    (m̂/√v̂ = 1), so the parameter's steps read back the schedule optax applied."""
    import jax.numpy as jnp

    from rlhf_jax.train_state import make_optimizer

    optim = cli.optimizer_for(OptimizerConfig(learning_rate=0.1, warmup_steps=3, b2=0.9, eps=0.0,
                                                   max_grad_norm=None, grad_accum_steps=accum), 12 * accum)
    assert optim.total_steps == 12 and optim.warmup_steps == 3
    tx = make_optimizer(optim)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    for call in range(1, 12 * accum + 1):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        step = -float(updates["w"])
        if call % accum == 0:
            assert step == pytest.approx(cli.learning_rate(optim, call), rel=1e-5, abs=1e-9), call
        else:
            assert step == 0.0


def test_optimizer_for_fits_a_short_run():
    optim = cli.optimizer_for(OptimizerConfig(warmup_steps=20, total_steps=10_000), 8)
    assert optim.total_steps == 8 and optim.warmup_steps == 7


def test_few_prompts_decode_in_a_smaller_batch_with_the_same_samples():
    """Five prompts with --sample.batch-size 64 decode 8 rows (``sampling.batch_rows``), and each prompt's
    sample, tokens and log-probs are those of the same key's 64-row call (the rows that used to be empty
    padding change nothing of the others')."""
    import jax

    from rlhf_jax import model_io, rollout, sampling

    assert [sampling.batch_rows(n, 64) for n in (1, 2, 3, 5, 8, 9, 33, 64, 100)] == [1, 2, 4, 8, 8, 16, 64, 64, 64]
    assert sampling.batch_rows(3, 64, multiple=8) == 8 and sampling.batch_rows(9, 12, multiple=8) == 12
    model_cfg, params, tokenizer = model_io.load_lm(cli.ModelArgs(), jax.random.key(0))
    prompts = ["the cat sat", "a red ball is", "tell me about dogs", "why", "the old man walked to the"]
    sample_args = cli.SampleArgs(max_prompt_len=48, max_new_tokens=12, batch_size=64)
    key = jax.random.key(4)
    texts, rollouts = sampling.sample(model_cfg, params, tokenizer, prompts, key=key, sample_args=sample_args)
    assert len(rollouts) == 1 and rollouts[0].response_ids_BR.shape[0] == 8
    (wide,) = sampling.prompt_batches(prompts, tokenizer, sample_args, multiple=64)
    wide, _ = sampling._fill_empty_prompts(wide, tokenizer.pad_token_id)
    r64 = rollout.generate(model_cfg, params, wide.prompt_ids_BP, wide.prompt_mask_BP, key=jax.random.fold_in(key, 0),
                           max_new_tokens=12, temperature=1.0, top_k=None, top_p=None,
                           eos_ids=model_io.eos_ids(model_cfg, tokenizer), pad_id=tokenizer.pad_token_id)
    assert r64.response_ids_BR.shape[0] == 64
    assert [[t] for t in sampling.decode_responses(tokenizer, r64)[:5]] == texts
    r8 = rollouts[0]
    np.testing.assert_array_equal(np.asarray(r8.response_ids_BR)[:5], np.asarray(r64.response_ids_BR)[:5])
    np.testing.assert_allclose(np.asarray(r8.logps_BR)[:5], np.asarray(r64.logps_BR)[:5], atol=1e-6)


def test_a_reference_memo_samples_the_reference_once_and_changes_no_figure(monkeypatch):
    """Three evaluations of one run (a frozen reference, the same prompts and seed) with a ``reference_memo`` sample
    the reference once, and give exactly the figures of evaluations without it."""
    import jax

    from rlhf_jax import model_io, models

    model_cfg, params, tokenizer = model_io.load_lm(cli.ModelArgs(), jax.random.key(0))
    ref_params = models.init_params(model_cfg, jax.random.key(1))
    prompts = ["the cat sat", "a red ball is", "tell me about dogs"]
    sample_args = cli.SampleArgs(max_prompt_len=16, max_new_tokens=6, batch_size=64)
    calls = []
    sample_model = evaluation.sample_model

    def counted(cfg, p, *a, **k):
        calls.append(p)
        return sample_model(cfg, p, *a, **k)
    monkeypatch.setattr(evaluation, "sample_model", counted)

    def run(policy, memo):
        return evaluation.evaluate_policy(model_cfg, policy, ref_params, tokenizer, prompts, seed=5,
                                          sample_args=sample_args, reference_memo=memo)

    memo: dict = {}
    policies = [params, models.init_params(model_cfg, jax.random.key(2)), params]
    with_memo = [run(p, memo) for p in policies]
    assert sum(c is ref_params for c in calls) == 1 and len(calls) == 4
    without = [run(p, None) for p in policies]
    assert sum(c is ref_params for c in calls) == 4
    assert with_memo == without
    assert with_memo[0]["samples"] != with_memo[1]["samples"]  # the policies differ, the reference is shared
