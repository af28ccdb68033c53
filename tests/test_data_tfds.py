"""TFDS round trips (file -> array_record dataset -> rows, no TensorFlow) and load_source."""
from __future__ import annotations

import json

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import (
    BinaryRow,
    DataError,
    Message,
    PairRow,
    PromptRow,
    RankRow,
    SFTRow,
    ValidationReport,
    build_tfds,
    load_rows,
    load_source,
    read_public,
    write_rows,
)

CHAT = (Message("system", "Be brief."), Message("user", "Say hi."))
ROWS = {
    "sft": [SFTRow("Translate to French: cheese", " fromage"), SFTRow(CHAT, "Hi!")],
    "pairwise": [PairRow("Name a prime.", " 7", " 8", 0.1), PairRow(CHAT, "Hi!", "Hello there."),
                 PairRow("é ünïcode ✓", " ja", " nein", 2.0)],
    "ranked": [RankRow("Rate my haiku.", (" Nice.", " Awful.", " Good."), (2, 0, 1)), RankRow(CHAT, ("a", "b"), (1, 0))],
    "binary": [BinaryRow("Tell a joke.", " Why did the chicken...", True), BinaryRow(CHAT, "Go away.", False)],
    "prompt": [PromptRow("Summarize: the cat sat on the mat."), PromptRow(CHAT)],
}


@pytest.fixture(autouse=True)
def quiet_tfds():
    tfds.disable_progress_bar()


@pytest.mark.parametrize("kind", list(ROWS))
def test_file_to_tfds_to_rows(tmp_path, kind):
    path = tmp_path / f"{kind}.jsonl"
    write_rows(path, ROWS[kind])
    build_tfds(kind, path, tmp_path / "tfds", name=f"my_{kind}")
    rows = load_source(f"tfds:my_{kind}", kind, data_dir=tmp_path / "tfds")
    assert rows == load_source(str(path), kind) == load_rows(path, kind) == ROWS[kind]  # margins exact (0.1)
    assert rows[1].source == f"tfds:my_{kind}/train[1]"
    # A plain TFDS dataset: other tools read it with the TFDS API alone.
    source = tfds.data_source(f"my_{kind}", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(source) == len(ROWS[kind]) and source[0]["prompt"] == ROWS[kind][0].prompt.encode()


def test_splits_public_layout_and_default_name(tmp_path):
    def hh(path, answers):
        path.write_text("".join(json.dumps({"chosen": f"\n\nHuman: Hi\n\nAssistant: {a}",
                                            "rejected": f"\n\nHuman: Hi\n\nAssistant: {b}"}) + "\n" for a, b in answers))
        return path

    train, val = hh(tmp_path / "train.jsonl", [("Hello!", "No.")]), hh(tmp_path / "test.jsonl", [("Hey.", "Go."), ("Yo", "Bye")])
    build_tfds("pairwise", {"train": train, "test": val}, tmp_path / "tfds", layout="hh_rlhf")
    assert load_source("tfds:rlhf_pairwise", "pairwise", data_dir=tmp_path / "tfds") == read_public(train, "hh_rlhf")
    test_rows = load_source("tfds:rlhf_pairwise", "pairwise", data_dir=tmp_path / "tfds", split="test")
    assert test_rows == load_source(val, "pairwise", layout="hh_rlhf")
    assert test_rows[1] == PairRow("\n\nHuman: Hi\n\nAssistant:", " Yo", " Bye")


def test_invalid_rows_fail_the_build_or_are_counted(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
                               json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"})]) + "\n")
    with pytest.raises(DataError, match=f"{path}:2:rejected"):
        build_tfds("pairwise", path, tmp_path / "tfds", name="prefs")
    report = ValidationReport()
    build_tfds("pairwise", path, tmp_path / "tfds", name="prefs", skip_invalid=True, report=report)
    assert report.skipped == {"identical_responses": 1}
    assert load_source("tfds:prefs", "pairwise", data_dir=tmp_path / "tfds") == [PairRow("p", "a", "b")]


def test_existing_dataset_kind_mismatch_and_names(tmp_path):
    data_dir = tmp_path / "tfds"
    write_rows(tmp_path / "a.jsonl", ROWS["binary"])
    build_tfds("binary", tmp_path / "a.jsonl", data_dir, name="fb")
    write_rows(tmp_path / "a.jsonl", ROWS["binary"][:1])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_tfds("binary", tmp_path / "a.jsonl", data_dir, name="fb")
    build_tfds("binary", tmp_path / "a.jsonl", data_dir, name="fb", overwrite=True)
    assert load_source("tfds:fb", "binary", data_dir=data_dir) == ROWS["binary"][:1]
    with pytest.raises(ValueError, match="tfds:fb holds binary rows, not sft"):
        load_source("tfds:fb", "sft", data_dir=data_dir)
    with pytest.raises(ValueError, match="snake_case"):
        build_tfds("binary", tmp_path / "a.jsonl", data_dir, name="My-Data")
