"""Chat templates end to end: text prompts as messages, completions ending at EOS, the reward model
trained on the token PPO scores, and truncation that never cuts a turn (rlhf_jax.data.chat, batching)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.tiny_tokenizer import make_tokenizer
from smollm2 import smollm2_gguf

from rlhf_jax import models, objectives
from rlhf_jax.data import (DataError, Message, PairRow, PromptRow, SFTRow, ValidationReport, collate_pairs,
                           collate_prompts, collate_sft, embedded, encode, encode_prompts, simulated)  # noqa: F401
from rlhf_jax.data.chat import as_conversation, transcript_messages

U, A = "user", "assistant"


def test_transcripts_become_turns_and_other_text_one_user_turn():
    hh = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert transcript_messages(hh) == (Message(U, "What is 2+2?"), Message(A, "4."), Message(U, "And 3+3?"))
    assert transcript_messages("Human: Hi\n\nAssistant:") == (Message(U, "Hi"),)  # no leading blank line
    world = "Customer: Hello, my parcel is late.\nAgent:"
    assert transcript_messages(world) == (Message(U, "Hello, my parcel is late."),)
    assert transcript_messages("Customer: a\nAgent: b\nCustomer: c\nAgent:") == (Message(U, "a"), Message(A, "b"),
                                                                             Message(U, "c"))
    # not awaiting the assistant, two assistant turns in a row, an empty turn: plain text
    for text in ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: a\n\nAssistant:",
                 "\n\nHuman: \n\nAssistant:", "Translate to French: cheese"):
        assert transcript_messages(text) is None
        assert as_conversation(text) == (Message(U, text.strip()),)
    conversation = (Message("system", "Be brief."), Message(U, "Hi"))
    assert as_conversation(conversation) is conversation


def test_auto_renders_text_prompts_with_the_template_and_off_leaves_them_raw():
    tok = make_tokenizer()
    row = SFTRow("\n\nHuman: Name a prime.\n\nAssistant:", " 7")
    on, = encode([row], tok, max_len=64)
    expected = tok.apply_chat_template([{"role": U, "content": "Name a prime."}, {"role": A, "content": "7"}],
                                       tokenize=False)
    assert tok.decode(np.concatenate([on.prompt_ids, on.completion_ids[0]])) == expected
    assert tok.decode(on.completion_ids[0]) == "7<eos>"  # the separator space is the template's business
    off, = encode([row], tok, max_len=64, chat_template="off")
    assert off.prompt_ids.tolist() == tok(row.prompt)["input_ids"]
    assert off.completion_ids[0].tolist() == tok(" 7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bare = make_tokenizer()
    bare.chat_template = None  # auto on a tokenizer without a template: raw; "on" refuses
    assert encode([row], bare, max_len=64)[0].prompt_ids.tolist() == off.prompt_ids.tolist()
    with pytest.raises(ValueError, match="--model.chat-template on, but the tokenizer has no chat template"):
        encode([row], bare, max_len=64, chat_template="on")


def test_embedded_world_encodes_the_same_with_the_template_on_or_off():
    """The embedded default's numbers must not move: its template renders a world prompt as itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded.embedded_dir()))
    rows = []
    for split in ("train", "eval"):
        rows += [SFTRow(r["prompt"], r["completion"]) for r in simulated.sft_rows(1500, 3, split)]
        rows += [PairRow(r["prompt"], r["chosen"], r["rejected"]) for r in simulated.pairwise_rows(500, 4, split)]
    for fn in (encode, encode_prompts):
        auto, off = fn(rows, tok, max_len=128), fn(rows, tok, max_len=128, chat_template="off")
        assert len(auto) == len(off) == len(rows)
        for a, o in zip(auto, off):
            assert a.prompt_ids.tolist() == o.prompt_ids.tolist()
            assert [c.tolist() for c in a.completion_ids] == [c.tolist() for c in o.completion_ids]


@pytest.fixture(scope="module")
def smol_tok():
    return models.load_tokenizer(smollm2_gguf())


def test_templated_completions_end_at_eos_not_at_the_templates_newline(smol_tok):
    """ChatML writes "<|im_end|>\\n" after an answer; a sampled reply stops at <|im_end|>."""
    row = PairRow((Message(U, "Name a prime."),), "7", "8")
    e, = encode([row], smol_tok, max_len=128)
    for c in e.completion_ids:
        assert c[-1] == smol_tok.eos_token_id and smol_tok.eos_token_id not in c[:-1].tolist()
    assert smol_tok.decode(e.completion_ids[0]) == "7<|im_end|>"
    with pytest.raises(DataError, match=r"^f\.jsonl:3:completion: the completion has the end-of-sequence token"):
        encode([SFTRow((Message(U, "Hi"),), "a<|im_end|>b", source="f.jsonl:3")], smol_tok, max_len=128)


def test_reward_model_is_trained_on_the_token_ppo_scores(smol_tok):
    """The score the reward model learns for a pair equals the score PPO gives the same reply when a
    policy samples it: same tokens up to and including EOS, and the head reads the same position."""
    cfg = models.ModelConfig(
        model_type="llama", vocab_size=len(smol_tok), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
        mlp_dim=64, activation="silu", gated_mlp=True, norm_type="rms", norm_eps=1e-5, position_type="rope",
        max_position_embeddings=256, qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=True, rotary_dim=16,
        eos_token_ids=(smol_tok.eos_token_id,))
    rm = {"backbone": models.init_params(cfg, jax.random.key(0)),
          "head": {"kernel": jax.random.normal(jax.random.key(1), (32,)), "bias": jnp.zeros(())}}
    prompt = "Customer: My parcel never arrived.\nAgent:"  # a text prompt, as the world writes them
    row = PairRow(prompt, " I will send a new one today.", " Not my problem.")
    pair = collate_pairs(encode([row], smol_tok, max_len=96), pad_id=smol_tok.pad_token_id, length=96)
    trained = objectives.reward_scores(cfg, rm, jnp.asarray(pair.chosen_ids_BT), jnp.asarray(pair.chosen_attention_mask_BT))

    # PPO's side: the left-padded prompt batch the rollout starts from, then the sampled reply up to
    # and including the EOS the sampler stopped at, then right padding (rlhf_jax.rollout's layout)
    prompts = collate_prompts(encode_prompts([PromptRow(prompt)], smol_tok, max_len=64), pad_id=smol_tok.pad_token_id,
                              length=64)
    sampled = smol_tok("I will send a new one today.", add_special_tokens=False)["input_ids"] + [smol_tok.eos_token_id]
    R = 24
    response = np.full((1, R), smol_tok.pad_token_id, np.int32)
    response[0, :len(sampled)] = sampled
    response_mask = (np.arange(R) < len(sampled)).astype(np.int32)[None]
    sequences = np.concatenate([prompts.prompt_ids_BP, response], 1)
    attention = np.concatenate([prompts.prompt_mask_BP, response_mask], 1)
    scored = objectives.reward_scores(cfg, rm, jnp.asarray(sequences), jnp.asarray(attention))

    real_train = pair.chosen_ids_BT[0][pair.chosen_attention_mask_BT[0] == 1].tolist()
    real_ppo = sequences[0][attention[0] == 1].tolist()
    assert real_train == real_ppo and real_train[-1] == smol_tok.eos_token_id
    np.testing.assert_allclose(np.asarray(trained), np.asarray(scored), rtol=1e-5, atol=1e-5)


def test_left_truncation_drops_whole_turns_never_the_system_or_last_user_turn(smol_tok):
    system = Message("system", "You answer in one word.")
    turns = (system, Message(U, "first question " * 20), Message(A, "first answer " * 20), Message(U, "Name a prime."))
    row = SFTRow(turns, "7", source="f.jsonl:9")
    full, = encode([row], smol_tok, max_len=512)
    report = ValidationReport()
    cut, = encode([row], smol_tok, max_len=len(full.prompt_ids), report=report)
    assert report.truncated == 1
    text = smol_tok.decode(cut.prompt_ids)
    expected = smol_tok.apply_chat_template([{"role": "system", "content": system.content},
                                             {"role": U, "content": "Name a prime."}], tokenize=False,
                                            add_generation_prompt=True)
    assert text == expected  # the system turn kept whole, the old exchange dropped, the question whole
    with pytest.raises(DataError, match=r"^f\.jsonl:9:prompt: the last turn alone .* never cuts the system or user"):
        encode([row], smol_tok, max_len=len(smol_tok(expected, add_special_tokens=False)["input_ids"]))
    # the other modes: error names the flag; drop counts; right keeps the prompt and cuts the completion
    with pytest.raises(DataError, match=r"^f\.jsonl:9:prompt: prompt \(\d+ tokens\) .* --data\.truncate drop"):
        encode([row], smol_tok, max_len=40, truncate="error")
    report = ValidationReport()
    assert encode([row], smol_tok, max_len=40, truncate="drop", report=report) == []
    assert report.skipped == {"too_long": 1}
    long_answer = SFTRow((Message(U, "Count."),), "one two three four five six seven eight nine ten", source="g:1")
    short, = encode([long_answer], smol_tok, max_len=512)
    report = ValidationReport()
    right, = encode([long_answer], smol_tok, max_len=short.length - 4, truncate="right", report=report)
    assert right.prompt_ids.tolist() == short.prompt_ids.tolist() and report.truncated == 1
    assert right.completion_ids[0].tolist() == short.completion_ids[0].tolist()[:-4]


def test_sft_batch_of_a_templated_text_row_trains_on_the_answer_and_its_eos_only(smol_tok):
    e = encode([SFTRow("What is the capital of France?", " Paris.")], smol_tok, max_len=96)
    batch = collate_sft(e, pad_id=smol_tok.pad_token_id, length=96)
    targets = batch.input_ids_BT[0, 1:][batch.loss_mask_BT[0, :-1] == 1]
    assert smol_tok.decode(targets) == "Paris.<|im_end|>"
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in smol_tok.decode(e[0].prompt_ids)
