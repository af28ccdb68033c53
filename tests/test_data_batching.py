"""Tokenization, masks, truncation, packing and padding of batches; the resumable iterator."""
from __future__ import annotations

import collections
import copy
import functools
import json

import numpy as np
import pytest
from fixtures.tiny_tokenizer import make_tokenizer

from rlhf_jax.data import (
    BatchIterator,
    BinaryRow,
    DataError,
    Message,
    PairRow,
    PromptRow,
    RankRow,
    SFTRow,
    ValidationReport,
    collate_binary,
    collate_pairs,
    collate_prompts,
    collate_ranked,
    collate_sft,
    encode,
    encode_prompts,
    pack,
    pad_length,
)

SAY_HI = (Message("user", "Say hi."),)
LONG = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def scored_targets(ids_T, mask_T) -> list[int]:
    """The tokens a shifted mask scores: position t predicts token t + 1."""
    assert mask_T[-1] == 0
    return [int(x) for x in ids_T[1:][mask_T[:-1] == 1]]


def test_sft_text_rows_ids_masks_positions(tok):
    rows = [SFTRow("Translate to French: cheese", " fromage"), SFTRow("Name a prime.", " 7")]
    batch = collate_sft(encode(rows, tok, max_len=40, chat_template="off"), pad_id=tok.pad_token_id, length=40)
    assert batch.input_ids_BT.shape == (2, 40) and batch.input_ids_BT.dtype == np.int32
    assert batch.loss_mask_BT.dtype == np.float32 and batch.attention_mask_BT.dtype == np.int32
    for b, row in enumerate(rows):
        completion = ids_of(tok, row.completion) + [tok.eos_token_id]
        expected = [tok.bos_token_id] + ids_of(tok, row.prompt) + completion
        n = len(expected)
        assert batch.input_ids_BT[b, :n].tolist() == expected
        assert (batch.input_ids_BT[b, n:] == tok.pad_token_id).all()
        assert batch.attention_mask_BT[b].tolist() == [1] * n + [0] * (40 - n)
        assert batch.segment_ids_BT[b].tolist() == [1] * n + [0] * (40 - n)
        assert batch.positions_BT[b, :n].tolist() == list(range(n))
        assert scored_targets(batch.input_ids_BT[b], batch.loss_mask_BT[b]) == completion
        assert batch.loss_mask_BT[b].sum() == len(completion)


def test_chat_rows_use_the_template_and_end_in_one_eos(tok):
    rows = [SFTRow(SAY_HI, "Hi!"), SFTRow("Name a prime.", " 7<eos>")]  # EOS already present: not doubled
    batch = collate_sft(encode(rows, tok, max_len=32, chat_template="off"), pad_id=tok.pad_token_id, length=32)
    n = int(batch.attention_mask_BT[0].sum())
    full = tok.apply_chat_template([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
                                   tokenize=False)
    assert full == "<|user|>Say hi.<eos><|assistant|>Hi!<eos>"
    assert tok.decode(batch.input_ids_BT[0, :n]) == full  # no BOS added to a rendered conversation
    assert tok.decode(scored_targets(batch.input_ids_BT[0], batch.loss_mask_BT[0])) == "Hi!<eos>"
    n = int(batch.attention_mask_BT[1].sum())
    assert batch.input_ids_BT[1, n - 2] != tok.eos_token_id and batch.input_ids_BT[1, n - 1] == tok.eos_token_id


def test_chat_template_errors(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode([SFTRow(SAY_HI, "Hi!", source="d.jsonl:4")], bare, max_len=32)
    odd = copy.deepcopy(tok)  # the generation prompt is not what an assistant turn starts with
    odd.chat_template = tok.chat_template.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    with pytest.raises(DataError, match=r"^d\.jsonl:4:prompt: the chat template does not render"):
        encode([SFTRow(SAY_HI, "Hi!", source="d.jsonl:4")], odd, max_len=32)


def test_pair_batch(tok):
    rows = [PairRow("Name a prime.", " 7", " eight", 0.5), PairRow(SAY_HI, "Hi!", "No.")]
    batch = collate_pairs(encode(rows, tok, max_len=32, chat_template="off"), pad_id=tok.pad_token_id, length=32)
    assert batch.chosen_ids_BT.shape == batch.rejected_ids_BT.shape == (2, 32)
    assert batch.margin_B.tolist() == [0.5, 0.0] and batch.margin_B.dtype == np.float32
    for b, row in enumerate(rows):
        chosen = scored_targets(batch.chosen_ids_BT[b], batch.chosen_response_mask_BT[b])
        rejected = scored_targets(batch.rejected_ids_BT[b], batch.rejected_response_mask_BT[b])
        assert tok.decode(chosen) == row.chosen + "<eos>"
        assert tok.decode(rejected) == row.rejected + "<eos>"
        start = int(np.argmax(batch.chosen_response_mask_BT[b])) + 1  # first completion token
        assert (batch.chosen_ids_BT[b, :start] == batch.rejected_ids_BT[b, :start]).all()  # shared prompt
        assert batch.chosen_attention_mask_BT[b].sum() == start + len(chosen)


def test_ranked_batch_orders_best_first_and_pads_responses(tok):
    rows = [RankRow("Rate my haiku.", (" Nice.", " Awful.", " Good."), (2, 0, 1)), RankRow("Name a prime.", (" 8", " 7"), (1, 0))]
    batch = collate_ranked(encode(rows, tok, max_len=24, chat_template="off"), pad_id=tok.pad_token_id, length=24, num_responses=4)
    assert batch.input_ids_BNT.shape == (2, 4, 24)
    assert batch.valid_BN.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    best_first = [[" Good.", " Nice.", " Awful."], [" 7", " 8"]]
    for b, texts in enumerate(best_first):
        for n, text in enumerate(texts):
            assert tok.decode(scored_targets(batch.input_ids_BNT[b, n], batch.response_mask_BNT[b, n])) == text + "<eos>"
    padded = batch.valid_BN == 0
    assert (batch.attention_mask_BNT[padded] == 0).all() and (batch.response_mask_BNT[padded] == 0).all()
    with pytest.raises(ValueError, match="a RankBatch row holds 2..2"):
        collate_ranked(encode(rows, tok, max_len=24, chat_template="off"), pad_id=0, length=24, num_responses=2)


def test_binary_batch(tok):
    rows = [BinaryRow("Tell a joke.", " No.", False), BinaryRow(SAY_HI, "Hi!", True)]
    batch = collate_binary(encode(rows, tok, max_len=32, chat_template="off"), pad_id=tok.pad_token_id, length=32)
    assert batch.label_B.tolist() == [0.0, 1.0]
    assert tok.decode(scored_targets(batch.input_ids_BT[0], batch.response_mask_BT[0])) == " No.<eos>"


def test_prompt_batch_is_left_padded(tok):
    rows = [PromptRow("Name a prime."), SFTRow(SAY_HI, "Hi!"), PairRow(LONG, " x", " y")]  # any row has a prompt
    prompts = encode_prompts(rows, tok, max_len=24, chat_template="off")
    assert all(len(e.completion_ids) == 0 for e in prompts)
    batch = collate_prompts(prompts, pad_id=tok.pad_token_id, length=32)
    assert batch.prompt_ids_BP.shape == (3, 32) and (batch.prompt_mask_BP[:, -1] == 1).all()
    first = [tok.bos_token_id] + ids_of(tok, "Name a prime.")
    assert batch.prompt_ids_BP[0].tolist() == [tok.pad_token_id] * (32 - len(first)) + first
    assert batch.prompt_mask_BP[0].tolist() == [0] * (32 - len(first)) + [1] * len(first)
    assert tok.decode(batch.prompt_ids_BP[1][batch.prompt_mask_BP[1] == 1]) == "<|user|>Say hi.<eos><|assistant|>"
    assert batch.prompt_mask_BP[2].sum() == 24  # truncated to max_len
    assert batch.prompt_ids_BP[2, -24] == tok.bos_token_id and batch.prompt_ids_BP[2, -1] == ids_of(tok, LONG)[-1]
    with pytest.raises(ValueError, match="no completion to train on; use encode_prompts"):
        encode(rows[:1], tok, max_len=24, chat_template="off")


def test_truncate_left_keeps_bos_and_completion(tok):
    report = ValidationReport()
    rows = [PairRow(LONG, " 7", " eight"), PairRow("Name a prime.", " 7", " 8")]
    encoded = encode(rows, tok, max_len=16, chat_template="off", report=report)
    full = [tok.bos_token_id] + ids_of(tok, LONG)
    longest = len(ids_of(tok, " eight")) + 1
    assert encoded[0].prompt_ids.tolist() == [tok.bos_token_id] + full[len(full) - (16 - longest - 1):]
    assert encoded[0].length == 16 and encoded[0].completion_ids[1].tolist() == ids_of(tok, " eight") + [tok.eos_token_id]
    assert encoded[1].prompt_ids.tolist() == [tok.bos_token_id] + ids_of(tok, "Name a prime.")
    assert report.truncated == 1 and report.num_skipped == 0


def test_truncate_drop_counts_and_reports(tok):
    rows = [SFTRow("Name a prime.", " 7", source="d.jsonl:1"), SFTRow(LONG, " 7", source="d.jsonl:2")]
    report = ValidationReport()
    encoded = encode(rows, tok, max_len=16, chat_template="off", truncate="drop", report=report)
    assert [e.source for e in encoded] == ["d.jsonl:1"]
    assert report.skipped == {"too_long": 1} and report.examples["too_long"][0].startswith("d.jsonl:2:prompt: prompt (")
    with pytest.warns(UserWarning, match="too_long: 1"):
        assert len(encode(rows, tok, max_len=16, chat_template="off", truncate="drop")) == 1


def test_completion_longer_than_max_len(tok):
    rows = [SFTRow("Name a prime.", LONG, source="d.jsonl:7")]
    with pytest.raises(DataError, match=r"^d\.jsonl:7:completion: the completion alone has \d+ tokens") as info:
        encode(rows, tok, max_len=16, chat_template="off")
    assert info.value.reason == "too_long"
    report = ValidationReport()
    assert encode(rows, tok, max_len=16, chat_template="off", truncate="drop", report=report) == [] and report.skipped["too_long"] == 1


def scored_contexts(batch) -> collections.Counter:
    """(context the model may attend to, its position, the target) for every scored position,
    using the packed-attention rule: same segment, causal."""
    out = collections.Counter()
    for b, t in zip(*np.nonzero(batch.loss_mask_BT)):
        seg = batch.segment_ids_BT[b]
        context = batch.input_ids_BT[b, : t + 1][seg[: t + 1] == seg[t]]
        out[(tuple(context.tolist()), int(batch.positions_BT[b, t]), int(batch.input_ids_BT[b, t + 1]))] += 1
    return out


def test_packing_scores_the_same_tokens_in_the_same_contexts(tok):
    texts = ["Name a prime.", "Say hi.", "Tell a joke.", "Translate to French: cheese", "Help", "What is 2+2?"]
    rows = [SFTRow(p, c) for p, c in zip(texts, [" 7", " Hi!", " No.", " fromage", " ok", " 4"])]
    encoded = encode(rows, tok, max_len=24, chat_template="off")
    packs = pack(encoded, 24)
    assert [e for p in packs for e in p] == encoded and len(packs) < len(encoded)
    assert all(sum(e.length for e in p) <= 24 for p in packs)
    packed = collate_sft(packs, pad_id=tok.pad_token_id, length=24)
    unpacked = collate_sft(encoded, pad_id=tok.pad_token_id, length=24)
    assert scored_contexts(packed) == scored_contexts(unpacked)
    assert packed.loss_mask_BT.sum() == unpacked.loss_mask_BT.sum()
    assert packed.segment_ids_BT.max() >= 2 and packed.attention_mask_BT.sum() == unpacked.attention_mask_BT.sum()
    first = packs[0]
    boundary = first[0].length  # the second example restarts positions at 0
    assert packed.positions_BT[0, boundary] == 0 and packed.segment_ids_BT[0, boundary] == 2
    assert packed.loss_mask_BT[0, boundary - 1] == 0  # EOS of example 1 does not predict example 2
    with pytest.raises(ValueError, match="only SFT examples"):
        pack(encode([PairRow("p", " a", " b")], tok, max_len=24), 24)


def test_pad_length_fixed_and_buckets(tok):
    assert pad_length(5, 32) == 32 and pad_length(5, [16, 8, 32]) == 8 and pad_length(9, (8, 16)) == 16
    with pytest.raises(ValueError, match="does not fit"):
        pad_length(33, [8, 16, 32])
    encoded = encode([SFTRow("Name a prime.", " 7")], tok, max_len=32, chat_template="off")
    assert collate_sft(encoded, pad_id=0, length=(8, 16, 32)).input_ids_BT.shape == (1, pad_length(encoded[0].length, (8, 16, 32)))


def test_none_rows_are_empty_and_kinds_are_checked(tok):
    encoded = encode([PairRow("Name a prime.", " 7", " 8")], tok, max_len=16, chat_template="off")
    batch = collate_pairs([encoded[0], None], pad_id=tok.pad_token_id, length=16)
    assert (batch.chosen_ids_BT[1] == tok.pad_token_id).all() and batch.chosen_attention_mask_BT[1].sum() == 0
    assert batch.chosen_response_mask_BT[1].sum() == batch.rejected_response_mask_BT[1].sum() == 0
    with pytest.raises(ValueError, match="need 1 completion"):
        collate_sft(encoded, pad_id=0, length=16)


# ---- iterator ---------------------------------------------------------------------------------


def take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_epochs_are_seeded_permutations():
    examples = list(range(10))
    it = BatchIterator(examples, list, batch_size=4, seed=3, process_index=0, process_count=1)
    assert it.batches_per_epoch == 2
    epoch0, epoch1 = take(it, 2), take(it, 2)
    for epoch in (epoch0, epoch1):
        flat = [x for batch in epoch for x in batch]
        assert len(set(flat)) == 8 and all(len(b) == 4 for b in epoch)
    assert epoch0 != epoch1
    again = BatchIterator(examples, list, batch_size=4, seed=3, process_index=0, process_count=1)
    assert take(again, 4) == epoch0 + epoch1
    other = BatchIterator(examples, list, batch_size=4, seed=4, process_index=0, process_count=1)
    assert take(other, 2) != epoch0
    ordered = BatchIterator(examples, list, batch_size=4, seed=3, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    assert list(ordered) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_iterator_pads_last_batch_explicitly():
    it = BatchIterator(list(range(10)), list, batch_size=4, seed=0, last_batch="pad", num_epochs=1,
                       process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == 3 and batches[-1][2:] == [None, None]
    assert sorted(x for b in batches for x in b if x is not None) == list(range(10))
    with pytest.raises(StopIteration):
        next(it)


def test_iterator_resumes_exactly_from_saved_state():
    examples = list(range(11))
    uninterrupted = take(BatchIterator(examples, list, batch_size=3, seed=7, process_index=0, process_count=1), 12)
    first = BatchIterator(examples, list, batch_size=3, seed=7, process_index=0, process_count=1)
    take(first, 5)  # into epoch 1 (3 batches per epoch)
    saved = json.dumps(first.get_state())
    assert json.loads(saved) == {"seed": 7, "epoch": 1, "index": 2}
    resumed = BatchIterator(examples, list, batch_size=3, seed=0, process_index=0, process_count=1)
    resumed.set_state(json.loads(saved))
    assert take(resumed, 7) == uninterrupted[5:]
    with pytest.raises(ValueError, match="keys seed, epoch, index"):
        resumed.set_state({"epoch": 0, "index": 0})
    with pytest.raises(ValueError, match="outside this data"):
        resumed.set_state({"seed": 0, "epoch": 0, "index": 3})


@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_iterator_hosts_take_slices_of_the_global_batch(last_batch):
    examples = list(range(13))
    kwargs = dict(batch_size=4, seed=1, last_batch=last_batch, num_epochs=2)
    single = list(BatchIterator(examples, list, process_index=0, process_count=1, **kwargs))
    hosts = [list(BatchIterator(examples, list, process_index=h, process_count=2, **kwargs)) for h in (0, 1)]
    assert all(len(h) == len(single) for h in hosts)
    assert [a + b for a, b in zip(*hosts)] == single
    with pytest.raises(ValueError, match="multiple of process_count"):
        BatchIterator(examples, list, batch_size=3, seed=0, process_index=0, process_count=2)


def test_iterator_with_collate_gives_static_shapes(tok):
    rows = [SFTRow(p, " ok") for p in ["Name a prime.", "Say hi.", "Tell a joke.", "Help", "What is 2+2?"]]
    collate = functools.partial(collate_sft, pad_id=tok.pad_token_id, length=16)
    it = BatchIterator(encode(rows, tok, max_len=16, chat_template="off"), collate, batch_size=2, seed=0, last_batch="pad", num_epochs=1,
                       process_index=0, process_count=1)
    batches = list(it)
    assert [b.input_ids_BT.shape for b in batches] == [(2, 16)] * 3
    assert batches[-1].attention_mask_BT[1].sum() == batches[-1].loss_mask_BT[1].sum() == 0
    with pytest.raises(ValueError, match="make no batch"):
        BatchIterator([1, 2], list, batch_size=4, seed=0, process_index=0, process_count=1)
