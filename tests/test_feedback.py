"""The terminal feedback collector (rlhf_jax.feedback): recording, resuming, kills, the model sampler."""
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
import tyro

from rlhf_jax import models
from rlhf_jax.data import embedded
from rlhf_jax.data.formats import load_rows
from rlhf_jax.data.simulated import prompt_rows
from rlhf_jax.data.validation import DataError
from rlhf_jax.feedback import collect, read_prompts, undecided_path
from rlhf_jax.feedback.__main__ import Args, main
from rlhf_jax.feedback.sampler import ModelSampler

PROMPTS = [r["prompt"] for r in prompt_rows(6, seed=0)]


def pair(prompt, seed, index):
    """A deterministic sampler: the pair depends only on (seed, index)."""
    return f" first {seed}:{index}", f" second {seed}:{index}"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def answers(out):
    """``{prompt index: choice}`` over both files, failing on any duplicate."""
    rows = lines(out) + lines(undecided_path(out))
    indices = [r["meta"]["prompt_index"] for r in rows]
    assert len(indices) == len(set(indices)), indices
    return {r["meta"]["prompt_index"]: r["meta"]["choice"] for r in rows}


def run(out, stdin, sampler=pair, seed=0, **kw):
    stdout = io.StringIO()
    session = collect(PROMPTS, out, sampler, seed=seed, stdin=io.StringIO(stdin), stdout=stdout, **kw)
    return session, stdout.getvalue()


def test_piped_answers_become_pairwise_rows(tmp_path):
    out = tmp_path / "answers.jsonl"
    session, shown = run(out, "1\n2\nt\ns\nbogus\n2\n1\n")
    assert (session.answered_before, session.answered_now, session.remaining) == (0, 6, 0)
    assert "please type one of 1, 2, t, s" in shown and PROMPTS[0] in shown and " second 0:5" in shown
    assert answers(out) == {0: "1", 1: "2", 2: "tie", 3: "skip", 4: "2", 5: "1"}
    rows = load_rows(out, "pairwise")  # ties and skips are not in the pairwise file
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [
        (PROMPTS[0], " first 0:0", " second 0:0"), (PROMPTS[1], " second 0:1", " first 0:1"),
        (PROMPTS[4], " second 0:4", " first 0:4"), (PROMPTS[5], " first 0:5", " second 0:5")]
    assert lines(out)[0]["meta"] == {"prompt_index": 0, "choice": "1", "seed": 0}
    assert lines(undecided_path(out))[0]["responses"] == [" first 0:2", " second 0:2"]
    assert undecided_path(out).name == "answers.undecided.jsonl"


def test_restart_resumes_at_the_first_unanswered_prompt(tmp_path):
    out = tmp_path / "answers.jsonl"
    session, _ = run(out, "1\ns\nq\n")  # q quits; end of input would too
    assert session.answered_now == 2
    session, shown = run(out, "2\n")
    assert (session.answered_before, session.answered_now, session.remaining) == (2, 1, 3)
    assert "2 of 6 prompts answered" in shown and "=== prompt 3 of 6 ===" in shown and PROMPTS[1] not in shown
    run(out, "t\n1\n2\n")
    assert answers(out) == {0: "1", 1: "skip", 2: "2", 3: "tie", 4: "1", 5: "2"}
    session, shown = run(out, "")
    assert session.answered_now == 0 and "6 of 6 prompts answered; 0 to go" in shown


def test_thumbs_and_identical_responses(tmp_path):
    out = tmp_path / "answers.jsonl"
    run(out, "1\nx\nu\nd\n2\n-\nu\n", thumbs=True)
    assert [r["meta"]["thumbs"] for r in lines(out)] == [[True, False], [None, True]]
    same = lambda prompt, seed, index: (" same", " same")  # noqa: E731
    _, shown = run(tmp_path / "same.jsonl", "1\nt\n", sampler=same)
    assert "only a tie or a skip" in shown and answers(tmp_path / "same.jsonl") == {0: "tie"}


def test_truncated_last_line_is_cut_and_its_prompt_asked_again(tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    run(out, "1\n2\nq\n")
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"prompt": "Customer: My ord')  # a kill in the middle of a write
    _, shown = run(out, "2\nq\n")
    assert f"{out}:3: cutting a truncated last line" in capsys.readouterr().err
    assert "=== prompt 3 of 6 ===" in shown
    assert out.read_bytes().startswith(whole) and answers(out) == {0: "1", 1: "2", 2: "2"}


def test_inconsistent_answer_files_are_errors_naming_file_and_line(tmp_path):
    out = tmp_path / "answers.jsonl"
    run(out, "1\n2\nq\n")
    good = out.read_text().splitlines()
    out.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    with pytest.raises(DataError, match=f"{out}:2:<json>: invalid JSON"):
        run(out, "")
    out.write_text("\n".join(good) + "\n")
    with pytest.raises(ValueError, match=f"{out}:1:meta.seed: .*seed 0.*rerun with --seed 0"):
        run(out, "", seed=1)
    with pytest.raises(ValueError, match=f"{out}:1:prompt: differs from prompt 0"):
        collect(list(reversed(PROMPTS)), out, pair, stdin=io.StringIO(""), stdout=io.StringIO())
    out.write_text("\n".join(good + good[:1]) + "\n")
    with pytest.raises(ValueError, match=f"{out}:3:meta.prompt_index: prompt 0 is also answered at {out}:1"):
        run(out, "")
    out.write_text("\n".join(good) + "\n")
    undecided_path(out).write_text(json.dumps({**json.loads(good[1]), "meta": {"prompt_index": 1, "choice": "tie", "seed": 0}}) + "\n")
    with pytest.raises(ValueError, match="undecided.jsonl:1:meta.prompt_index: prompt 1 is also answered at .*answers.jsonl:2"):
        run(out, "")


def test_read_prompts_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Customer: Hi.\nAgent:"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:3:prompt: missing field 'prompt'"):
        read_prompts(path)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(DataError, match=f"{path}:1:prompt: the collector takes text prompts"):
        read_prompts(path)
    path.write_text(json.dumps({"prompt": "Customer: Hi.\nAgent:"}) + "\n{oops\n")
    with pytest.raises(DataError, match=f"{path}:2:<json>"):
        read_prompts(path)


_CHILD = """
import sys
from rlhf_jax.feedback import collect, read_prompts
def pair(prompt, seed, index):
    return f" first {seed}:{index}", f" second {seed}:{index}"
collect(read_prompts(sys.argv[1]), sys.argv[2], pair, seed=3)
"""


def test_sigkill_mid_session_loses_and_duplicates_nothing(tmp_path):
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    intended = ["1", "t", "2", "s", "2", "1"]
    keys = {"1": "1", "2": "2", "tie": "t", "skip": "s"}
    command = [sys.executable, "-c", _CHILD, str(prompts_file), str(out)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for k, key in enumerate(intended[:3]):
            child.stdin.write(key + "\n")
            child.stdin.flush()
            deadline = time.monotonic() + 60
            while len(answers(out)) < k + 1:  # the answer is on disk before the next pair is shown
                assert time.monotonic() < deadline and child.poll() is None, "collector did not record the answer"
                time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert answers(out) == {0: "1", 1: "tie", 2: "2"}
    done = subprocess.run(command, input="\n".join(intended[3:]) + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 of 6 prompts answered" in done.stdout and "=== prompt 4 of 6 ===" in done.stdout
    recorded = answers(out)
    assert [keys[recorded[i]] for i in range(len(PROMPTS))] == intended
    assert all(r["chosen"].endswith(f" 3:{r['meta']['prompt_index']}") for r in lines(out))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama in Hugging Face layout with the embedded tokenizer."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = embedded.build_tokenizer(embedded.tokenizer_corpus(n=300))
    tokenizer.save_pretrained(path)
    cfg = models.ModelConfig.from_hf_config(embedded.model_config(tokenizer).to_dict())
    cfg = dataclasses.replace(cfg, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
    models.save_pretrained(path, cfg, models.init_params(cfg, jax.random.key(0)))
    return path


def test_model_sampler_is_deterministic_in_seed_and_index(model_dir):
    sampler = ModelSampler(model_dir, PROMPTS, max_new_tokens=10)
    first = sampler(PROMPTS[0], 5, 0)
    assert all(isinstance(r, str) for r in first) and first[0] != first[1]
    assert sampler(PROMPTS[0], 5, 0) == first
    assert sampler(PROMPTS[0], 5, 1) != first and sampler(PROMPTS[0], 6, 0) != first
    with pytest.raises(ValueError, match="more than the"):
        sampler(PROMPTS[0] + " Please answer quickly, this is very urgent.", 5, 0)


def test_cli_collects_from_a_checkpoint_and_resumes_with_the_same_pairs(model_dir, tmp_path, monkeypatch, capsys):
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    args = tyro.cli(Args, args=["--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
                                "--seed", "4", "--max-new-tokens", "10", "--thumbs"])
    assert (args.seed, args.max_new_tokens, args.thumbs) == (4, 10, True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\nu\nd\n"))  # then end of input, at prompt 2
    assert main(args) == 0
    first_run = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n-\n-\nq\n"))
    assert main(args) == 0
    second_run = capsys.readouterr().out
    shown_again = second_run.split("=== prompt 2 of 6 ===")[1].split("Better response?")[0]
    assert shown_again in first_run  # prompt 2 was shown before the first run stopped: same pair
    rows = lines(out)
    assert [r["meta"]["choice"] for r in rows] == ["1", "2"] and rows[0]["meta"]["thumbs"] == [True, False]
    sampler = ModelSampler(model_dir, PROMPTS, max_new_tokens=10)
    assert (rows[0]["chosen"], rows[0]["rejected"]) == sampler(PROMPTS[0], 4, 0)
    assert (rows[1]["rejected"], rows[1]["chosen"]) == sampler(PROMPTS[1], 4, 1)
