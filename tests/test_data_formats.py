"""Feedback formats: round trips, every validation error (file:line:field), skip_invalid reports,
and the public layouts (HH-RLHF, summarize-from-feedback, TRL / UltraFeedback) split exactly."""
from __future__ import annotations

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import (
    BinaryRow,
    DataError,
    Message,
    PairRow,
    PromptRow,
    RankRow,
    SFTRow,
    ValidationReport,
    load_rows,
    rank_to_pairs,
    read_public,
    write_rows,
)

CHAT = (Message("system", "Be brief."), Message("user", "Say hi."))
ROWS = {
    "sft": [SFTRow("Translate to French: cheese", " fromage"), SFTRow(CHAT, "Hi!"), SFTRow("Name a prime.", " 7\n")],
    "pairwise": [PairRow("Name a prime.", " 7", " 8", 1.0), PairRow(CHAT, "Hi!", "Hello there.", 0.1),
                 PairRow("é ünïcode ✓", " ja", " nein")],
    "ranked": [RankRow("Rate my haiku.", (" Nice.", " Awful.", " Good."), (2, 0, 1)),
               RankRow(CHAT, ("a", "b"), (1, 0))],
    "binary": [BinaryRow("Tell a joke.", " Why did the chicken...", True), BinaryRow(CHAT, "Go away.", False)],
    "prompt": [PromptRow("Summarize: the cat sat on the mat."), PromptRow(CHAT)],
}


def at(path, line: int, field: str) -> str:
    """Regex for the start of an error message: ``file:line:field: ``."""
    return "^" + re.escape(f"{path}:{line}:{field}: ")


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json.gz", ".parquet"])
def test_write_load_round_trip(tmp_path, kind, suffix):
    rows = ROWS[kind]
    if suffix == ".parquet":  # one type per Parquet column: text prompts and conversation prompts in two files
        for part, keep in (("text", str), ("chat", tuple)):
            subset = [r for r in rows if isinstance(r.prompt, keep)]
            write_rows(tmp_path / f"{part}{suffix}", subset)
            assert load_rows(tmp_path / f"{part}{suffix}", kind) == subset
    else:
        write_rows(tmp_path / f"rows{suffix}", rows)
        loaded = load_rows(tmp_path / f"rows{suffix}", kind)
        assert loaded == rows
        assert [r.source for r in loaded] == [f"{tmp_path}/rows{suffix}:{i}" for i in (1, 2, 3)][: len(rows)]


def test_parquet_rejects_mixed_prompt_types(tmp_path):
    with pytest.raises(ValueError, match="Parquet needs one type per column"):
        write_rows(tmp_path / "x.parquet", ROWS["sft"])


def test_write_rows_rejects_mixed_kinds(tmp_path):
    with pytest.raises(ValueError, match="several kinds"):
        write_rows(tmp_path / "x.jsonl", [ROWS["sft"][0], ROWS["binary"][0]])


def test_sft_messages_form_and_canonical_examples(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}),
        "",  # blank lines are not records
        json.dumps({"prompt": "Translate to French: cheese", "completion": " fromage", "id": 7}),  # extra field ignored
    ])
    rows = load_rows(path, "sft")
    assert rows == [SFTRow((Message("user", "Say hi."),), "Hi!"), SFTRow("Translate to French: cheese", " fromage")]
    assert rows[1].source == f"{path}:3"


def test_binary_label_accepts_bool_and_01(tmp_path):
    lines = [json.dumps({"prompt": "p", "completion": "c", "label": x}) for x in (True, False, 1, 0)]
    assert [r.label for r in load_rows(write_lines(tmp_path / "b.jsonl", lines), "binary")] == [True, False, True, False]


OK = {
    "sft": {"prompt": "p", "completion": "c"},
    "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "ranked": {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    "binary": {"prompt": "p", "completion": "c", "label": 1},
    "prompt": {"prompt": "p"},
}
# (kind, line 2 of the file, field named in the error, reason)
BAD = [
    ("pairwise", '{"prompt": "p", "chosen": "a", ', "<json>", "bad_json"),
    ("pairwise", '["p", "a", "b"]', "<row>", "not_an_object"),
    ("pairwise", {"prompt": "p", "chosen": "a"}, "rejected", "missing_field"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "missing_field"),
    ("pairwise", {"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "wrong_type"),
    ("pairwise", {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "chosen", "wrong_type"),
    ("pairwise", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty_text"),
    ("pairwise", {"prompt": "p", "chosen": " \n", "rejected": "b"}, "chosen", "empty_text"),
    ("pairwise", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical_responses"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "bad_margin"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin", "bad_margin"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -0.5}, "margin", "bad_margin"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}, "margin", "wrong_type"),
    ("pairwise", {"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "empty_text"),
    ("pairwise", {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "missing_field"),
    ("pairwise", {"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "empty_text"),
    ("pairwise", {"prompt": ["hi"], "chosen": "a", "rejected": "b"}, "prompt[0]", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "ranking", "bad_ranking"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}, "ranking", "bad_ranking"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}, "ranking", "bad_ranking"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "ranking": ["0", "1"]}, "ranking", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "ranking", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}, "responses", "identical_responses"),
    ("ranked", {"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1]", "empty_text"),
    ("binary", {"prompt": "p", "completion": "c", "label": 2}, "label", "bad_label"),
    ("binary", {"prompt": "p", "completion": "c", "label": "yes"}, "label", "bad_label"),
    ("binary", {"prompt": "p", "completion": "c", "label": 1.0}, "label", "bad_label"),
    ("binary", {"prompt": "p", "completion": "c"}, "label", "missing_field"),
    ("sft", {"prompt": "p"}, "completion", "missing_field"),
    ("prompt", {"question": "p"}, "prompt", "missing_field"),
    ("prompt", {"prompt": {"role": "user", "content": "p"}}, "prompt", "wrong_type"),
    ("sft", {"messages": [{"role": "user", "content": "q"}]}, "messages", "bad_messages"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}, "messages", "bad_messages"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     "messages[1].content", "wrong_type"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": "p"},
     "messages", "bad_messages"),
]


@pytest.mark.parametrize("kind,bad,field,reason", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_row_names_file_line_field(tmp_path, kind, bad, field, reason):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(OK[kind]), bad if isinstance(bad, str) else json.dumps(bad)])
    with pytest.raises(DataError) as info:
        load_rows(path, kind)
    assert str(info.value).startswith(f"{path}:2:{field}: ")
    assert (info.value.reason, info.value.field, info.value.source) == (reason, field, f"{path}:2")


def test_json_array_gets_a_hint(tmp_path):
    path = write_lines(tmp_path / "alpaca.json", ["[", json.dumps(OK["sft"]) + ",", "]"])
    with pytest.raises(DataError, match=at(path, 1, "<json>") + r"invalid JSON: .* \(a JSON array\? one object per line"):
        load_rows(path, "sft")


def test_parquet_errors_name_the_row(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"prompt": ["p", "q", "r"], "chosen": ["a", "x", "b"], "rejected": ["b", "x", "c"]}), path)
    with pytest.raises(DataError, match=at(path, 2, "rejected") + "responses 0 and 1 are identical"):
        load_rows(path, "pairwise")


def test_skip_invalid_counts_per_reason_and_keeps_good_rows(tmp_path):
    lines = [json.dumps(OK["pairwise"])] + [b if isinstance(b, str) else json.dumps(b) for k, b, _, _ in BAD if k == "pairwise"]
    lines.append(json.dumps({"prompt": "p2", "chosen": "c", "rejected": "d", "margin": 2}))
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    report = ValidationReport(max_examples=2)
    rows = load_rows(path, "pairwise", skip_invalid=True, report=report)
    assert rows == [PairRow("p", "a", "b"), PairRow("p2", "c", "d", 2.0)]
    assert report.rows_read == len(lines) and report.num_skipped == len(lines) - 2
    assert dict(report.skipped) == {"bad_json": 1, "not_an_object": 1, "missing_field": 3, "wrong_type": 4,
                                    "empty_text": 4, "identical_responses": 1, "bad_margin": 3}
    assert report.examples["empty_text"] == [f"{path}:8:prompt: text is empty", f"{path}:9:chosen: text is empty"]
    summary = report.summary()
    assert summary.startswith(f"{len(lines)} rows read, {len(lines) - 2} skipped") and "bad_margin: 3" in summary


def test_skip_invalid_without_report_warns(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps(OK["binary"]), json.dumps({**OK["binary"], "label": 3})])
    with pytest.warns(UserWarning, match="bad_label: 1"):
        assert len(load_rows(path, "binary", skip_invalid=True)) == 1


def test_unknown_kind_and_file_type(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        load_rows(tmp_path / "x.jsonl", "preference")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(tmp_path / "x.csv", "sft")


def test_rank_to_pairs_gives_all_ordered_pairs():
    pairs = rank_to_pairs(RankRow("p", ("a", "b", "c", "d"), (2, 0, 3, 1)))
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")]
    assert len(pairs) == 4 * 3 // 2


# ---- public layouts ---------------------------------------------------------------------------

HH = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Seven, I think."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
]


def test_hh_rlhf_splits_at_last_assistant_turn(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in HH)
    rows = read_public(path)  # auto-detected: chosen/rejected strings and no prompt
    assert rows == [
        PairRow("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:", " 6.", " Seven, I think."),
        PairRow("\n\nHuman: Hi\n\nAssistant:", " Hello! How can I help?", " Go away."),
    ]
    assert read_public(path, "hh_rlhf", kind="sft")[1] == SFTRow("\n\nHuman: Hi\n\nAssistant:", " Hello! How can I help?")


@pytest.mark.parametrize("record,field,reason", [
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hey\n\nAssistant: B"}, "rejected", "prefix_mismatch"),
    ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "chosen", "bad_messages"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "chosen", "empty_text"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: B", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "rejected", "identical_responses"),
])
def test_hh_rlhf_errors(tmp_path, record, field, reason):
    path = write_lines(tmp_path / "hh.jsonl", [json.dumps(HH[1]), json.dumps(record)])
    with pytest.raises(DataError, match=at(path, 2, field)) as info:
        read_public(path, "hh_rlhf")
    assert info.value.reason == reason
    report = ValidationReport()
    assert len(read_public(path, "hh_rlhf", skip_invalid=True, report=report)) == 1 and report.skipped[reason] == 1


def tldr_record(choice, **info):
    return {
        "info": {"id": "t3_x", "post": "My friend forgot my birthday.\n\nShould I be upset?", "title": "Help",
                 "subreddit": "relationships", **info},
        "split": "train",
        "summaries": [{"text": " friend forgot bday", "policy": "ref", "note": None},
                      {"text": " friend forgot my birthday, am I overreacting?", "policy": "sup4", "note": "ok"}],
        "choice": choice, "worker": "w1", "batch": "batch3", "extra": {"confidence": 8},
    }


def test_tldr_comparisons_build_paper_prompt(tmp_path):
    path = write_lines(tmp_path / "batch3.json", [json.dumps(tldr_record(1)), json.dumps(tldr_record(0))])
    prompt = "SUBREDDIT: r/relationships\nTITLE: Help\nPOST: My friend forgot my birthday.\n\nShould I be upset?\nTL;DR:"
    assert read_public(path) == [
        PairRow(prompt, " friend forgot my birthday, am I overreacting?", " friend forgot bday"),
        PairRow(prompt, " friend forgot bday", " friend forgot my birthday, am I overreacting?"),
    ]
    custom = read_public(path, "tldr", tldr_template="{title}\n{post}\nTL;DR:")
    assert custom[0].prompt == "Help\nMy friend forgot my birthday.\n\nShould I be upset?\nTL;DR:"


@pytest.mark.parametrize("record,field", [
    ({**tldr_record(1), "choice": 2}, "choice"),
    ({**tldr_record(1), "choice": True}, "choice"),
    (tldr_record(0, post=None), "info.post"),
    ({**tldr_record(0), "summaries": [{"text": "a"}]}, "summaries"),
    ({**tldr_record(0), "summaries": [{"text": "a"}, {"txt": "b"}]}, "summaries[1].text"),
])
def test_tldr_errors(tmp_path, record, field):
    path = write_lines(tmp_path / "batch.json", [json.dumps(record)])
    with pytest.raises(DataError, match=at(path, 1, field)):
        read_public(path, "tldr")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_trl_and_ultrafeedback_layouts(tmp_path):
    records = [
        {"prompt": "Name a prime.", "chosen": " 7", "rejected": " 8"},  # standard, text
        {"prompt": [user("Say hi.")], "chosen": [assistant("Hi!")], "rejected": [assistant("No.")]},  # TRL conversational
        {"prompt": "Say hi.", "chosen": [user("Say hi."), assistant("Hi!")],  # UltraFeedback binarized
         "rejected": [user("Say hi."), assistant("No.")], "messages": [user("Say hi."), assistant("Hi!")],
         "score_chosen": 8.0, "score_rejected": 3.0, "prompt_id": "abc"},
        {"chosen": [user("Q1"), assistant("A1"), user("Say hi.")] + [assistant("Hi!")],  # implicit prompt
         "rejected": [user("Q1"), assistant("A1"), user("Say hi."), assistant("No.")]},
    ]
    uf2 = {**records[2], "prompt": "Name a prime.", "chosen": [user("Name a prime."), assistant("7")],
           "rejected": [user("Name a prime."), assistant("8")]}
    path = str(tmp_path / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([records[2], uf2]), path)
    say_hi = (Message("user", "Say hi."),)
    assert read_public(path) == [PairRow(say_hi, "Hi!", "No."), PairRow((Message("user", "Name a prime."),), "7", "8")]
    jsonl = write_lines(tmp_path / "trl.jsonl", [json.dumps(r) for r in records])
    rows = read_public(jsonl, "trl")
    assert rows[0] == PairRow("Name a prime.", " 7", " 8")
    assert rows[1] == rows[2] == PairRow(say_hi, "Hi!", "No.")
    assert rows[3] == PairRow((Message("user", "Q1"), Message("assistant", "A1")) + say_hi, "Hi!", "No.")
    assert read_public(jsonl) == rows  # auto-detected from the first record


@pytest.mark.parametrize("record,field,reason", [
    ({"prompt": "Say hi.", "chosen": [user("Other."), assistant("Hi!")], "rejected": " No."}, "chosen", "bad_messages"),
    ({"prompt": [user("Say hi.")], "chosen": [assistant("Hi!"), assistant("More")], "rejected": "x"}, "chosen", "bad_messages"),
    ({"chosen": [user("A"), assistant("Hi!")], "rejected": [user("B"), assistant("No.")]}, "rejected", "prefix_mismatch"),
    ({"chosen": [assistant("Hi!")], "rejected": [assistant("No.")]}, "chosen", "bad_messages"),
    ({"prompt": "Say hi.", "chosen": [assistant("Hi!")], "rejected": [assistant("Hi!")]}, "rejected", "identical_responses"),
])
def test_trl_errors(tmp_path, record, field, reason):
    path = write_lines(tmp_path / "trl.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=at(path, 1, field)) as info:
        read_public(path, "trl")
    assert info.value.reason == reason


def test_auto_detection_refuses_unknown_layouts(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ["not json", json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError, match=at(path, 2, "<row>") + "cannot tell the layout"):
        read_public(path)
    with pytest.raises(ValueError, match="kind must be 'pairwise' or 'sft'"):
        read_public(path, kind="ranked")

