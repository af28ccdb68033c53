"""GGUF import against transformers' own GGUF loader (``from_pretrained(dir, gguf_file=name)``), the oracle.

SmolLM2-135M-Instruct (Q4_1/Q8_0, GQA 9/3 heads, tied embeddings): logits from the .gguf and from the
directory our converter writes, greedy replies of 64 tokens, the tokenizer and its chat template.
Tiny synthetic GGUF files written with ``gguf.GGUFWriter`` (F32, F16, BF16 and quantised tensors, GQA):
the Q/K permutation and qwen2's biases checked independently of SmolLM2, the converter, and the errors.
Each side loads SmolLM2 once (module fixtures).
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gguf  # the test extra installs gguf, torch, transformers and accelerate: missing ones fail, not skip
import torch
import transformers
import accelerate  # noqa: F401  (transformers' GGUF loader needs it)

from hf_fixtures import hf_logits  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
from smollm2 import smollm2_gguf, smollm2_hf_dir  # noqa: E402

from rlhf_jax import models, rollout  # noqa: E402
from rlhf_jax.models import gguf as our_gguf  # noqa: E402
from rlhf_jax.models.convert import convert_gguf, main as convert_main  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is water wet?"}],
]
R = 64
_forward = jax.jit(models.forward, static_argnums=0)


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """The torch oracle on one intra-op thread: with the 2 cores shared by other processes, torch's
    2-thread decode steps stall in thread barriers (16 greedy SmolLM2 tokens: 68 s vs 2.6 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    """max |Δ| / max |logits| over real (unpadded) positions."""
    m = mask.astype(bool)
    return float(np.abs(ours[m] - want[m]).max() / np.abs(want[m]).max())


def hf_gguf_model(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def hf_gguf_tokenizer(path: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ----------------------------------------------------------------------------------------------
# SmolLM2


@pytest.fixture(scope="module")
def smol():
    """Ours, from the .gguf: (path, cfg, params, tokenizer)."""
    path = smollm2_gguf()
    cfg, params = models.load_pretrained(path)
    return path, cfg, params, models.load_tokenizer(path)


@pytest.fixture(scope="module")
def prompts(smol):
    """Left-padded chat prompts rendered with the GGUF's chat template."""
    tokenizer = smol[3]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, return_tensors="np")
    assert enc["attention_mask"].sum(1).min() < enc["attention_mask"].shape[1]  # some row is padded
    return texts, enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def oracle(smol, prompts):
    """transformers' GGUF loader: (logits of the prompts, greedy sequences of R tokens)."""
    _, ids, mask = prompts
    model = hf_gguf_model(smol[0])
    logits = hf_logits(model, ids, mask)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                             do_sample=False, max_new_tokens=R, eos_token_id=2, pad_token_id=2).numpy()
    del model
    return logits, np.pad(out, ((0, 0), (0, ids.shape[1] + R - out.shape[1])), constant_values=2)


def test_smollm2_config_from_metadata(smol):
    _, cfg, params, _ = smol
    assert (cfg.model_type, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim, cfg.vocab_size) == (
        "llama", 30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and "lm_head" not in params  # no output.weight in the file
    assert (cfg.rope_theta, cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1e5, 1, (2,), 2)


def test_smollm2_gguf_logits_match_transformers(smol, prompts, oracle):
    _, cfg, params, _ = smol
    _, ids, mask = prompts
    ours = np.asarray(_forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_err(ours, oracle[0], mask) < 1e-5


def test_smollm2_converted_dir_matches_transformers(smol, prompts, oracle):
    """Our converter's directory: same config, our logits and transformers' (plain safetensors load) match
    the GGUF oracle; its tokenizer files load in AutoTokenizer as the same tokenizer and chat template."""
    path, cfg, _, tokenizer = smol
    _, ids, mask = prompts
    hf_dir = smollm2_hf_dir()
    cfg_dir, params_dir = models.load_pretrained(hf_dir)
    assert cfg_dir == cfg
    ours = np.asarray(_forward(cfg_dir, params_dir, jnp.asarray(ids), jnp.asarray(mask)))
    del params_dir
    assert rel_err(ours, oracle[0], mask) < 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert rel_err(hf_logits(model, ids, mask), oracle[0], mask) < 1e-5
    del model
    reloaded = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for chat in CHATS:
        assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_smollm2_greedy_replies_match_transformers_generate(smol, prompts, oracle):
    _, cfg, params, _ = smol
    _, ids, mask = prompts
    out = rollout.generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(0), max_new_tokens=R,
                           temperature=0.0, eos_ids=(2,), pad_id=2)
    np.testing.assert_array_equal(np.asarray(out.sequences_BT), oracle[1])


TEXTS = [
    "Hello world!",
    "What is 2+2? In 2024 I paid $1,234.56 for 3 items.",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "  leading spaces,\ttabs\n\nand newlines ",
    "ünïcödé, 日本語 and 🙂",
    "don't I'll we've <repo_name>x<file_sep>",
]


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol):
    path, _, _, ours = smol
    ref = hf_gguf_tokenizer(path)
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        ids = ours(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref) == 49152
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours(ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False))["input_ids"] == \
                ref(ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False))["input_ids"]


def test_smollm2_pre_tokenizer_is_llama_cpps(smol):
    """``tokenizer.ggml.pre == "smollm"``: llama.cpp (llama-vocab.cpp) splits on ``\\p{N}`` first, then with
    GPT-2's regex. transformers' GGUF tokenizer uses GPT-2's regex alone, which differs where spaces
    precede a digit ("a  12": ours "a", "ĠĠ", "1", "2"; transformers "a", "Ġ", "Ġ", "1", "2")."""
    import regex  # a transformers dependency
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    byte = bytes_to_unicode()

    def llama_cpp(text: str) -> list[str]:
        pieces = [p for p in regex.split(r"(\p{N})", text) if p]
        return ["".join(byte[b] for b in w.encode()) for p in pieces for w in gpt2.findall(p)]

    pre = smol[3].backend_tokenizer.pre_tokenizer
    for text in ["a  12 b   345", "x 1", "  7\n\n 42", *TEXTS[:2], TEXTS[3]]:
        assert [w for w, _ in pre.pre_tokenize_str(text)] == llama_cpp(text), text


# ----------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files

T = gguf.GGMLQuantizationType
TINY = dict(V=128, D=64, F=96, H=4, K=2, L=2)  # head_dim 16, GQA 4/2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (n_head already the kv count for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(2 * 3 * 8, 5)).astype(np.float32)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(our_gguf._unpermute(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def tiny_vocab(V: int) -> tuple[list[str], list[int], list[str]]:
    """Byte-level tokens (3 control tokens, then byte characters and a few merged tokens) and merges."""
    chars = list(bytes_to_unicode().values())
    merged = ["Ġt", "he", "Ġthe", "Ġa", "in"]
    tokens = ["<pad>", "<s>", "</s>"] + merged + ["Ġ"]
    tokens += [c for c in chars if c not in tokens][: V - len(tokens)]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    return tokens, [3, 3, 3] + [1] * (V - 3), merges


def write_tiny_gguf(path: pathlib.Path, arch: str = "llama", *, seed: int = 0, qtypes: dict[str, T] | None = None,
                    raw: dict[str, tuple[np.ndarray, T]] | None = None, tokenizer_model: str = "gpt2") -> pathlib.Path:
    """A random tiny ``arch`` model as llama.cpp would write it. ``qtypes``: storage type per tensor-name
    suffix (default F32); ``raw``: tensors stored as given bytes of a type (for unsupported types)."""
    V, D, F, H, K, L = (TINY[k] for k in "VDFHKL")
    E = D // H
    rng = np.random.default_rng(seed)
    qtypes = {"attn_q.weight": T.Q8_0, "attn_k.weight": T.Q8_0, "attn_v.weight": T.BF16, "ffn_gate.weight": T.F16,
              "ffn_up.weight": T.Q4_1, "ffn_down.weight": T.Q5_0, "token_embd.weight": T.Q8_0,
              "output.weight": T.F16} | (qtypes or {})
    raw = raw or {}
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    if arch == "llama":
        shapes["output.weight"] = (V, D)  # untied; qwen2 ties (no output.weight)
    for i in range(L):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (D,), b + "ffn_norm.weight": (D,), b + "attn_q.weight": (H * E, D),
                   b + "attn_k.weight": (K * E, D), b + "attn_v.weight": (K * E, D), b + "attn_output.weight": (D, H * E),
                   b + "ffn_gate.weight": (F, D), b + "ffn_up.weight": (F, D), b + "ffn_down.weight": (D, F)}
        if arch != "llama":
            shapes |= {b + "attn_q.bias": (H * E,), b + "attn_k.bias": (K * E,), b + "attn_v.bias": (K * E,)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", "tiny")
    for key, value in (("block_count", L), ("context_length", 256), ("embedding_length", D), ("feed_forward_length", F),
                       ("attention.head_count", H), ("attention.head_count_kv", K), ("rope.dimension_count", E),
                       ("vocab_size", V)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 5000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    tokens, types, merges = tiny_vocab(V)
    w.add_string("tokenizer.ggml.model", tokenizer_model)
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    for field, token_id in (("bos", 1), ("eos", 2), ("padding", 0)):
        w.add_uint32(f"tokenizer.ggml.{field}_token_id", token_id)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    for name, shape in shapes.items():
        if name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
            continue
        is_norm = name.endswith("norm.weight")
        x = (rng.normal(size=shape) * 0.3 + (1.0 if is_norm else 0.0)).astype(np.float32)
        qtype = T.F32 if is_norm or name.endswith(".bias") else qtypes.get(name.split(".", 2)[-1] if name.startswith(
            "blk.") else name, T.F32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_IDS = np.array([[0, 0, 5, 17, 40, 99, 3], [7, 8, 9, 10, 11, 12, 13]])
TINY_MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # row 0 left-padded


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(arch, tmp_path):
    """llama: untied, Q/K stored permuted (Q8_0), GQA; qwen2: q/k/v biases, tied, unpermuted. Our logits
    equal transformers' on the same file; the converted directory loads in transformers with them too."""
    (tmp_path / "src").mkdir()
    path = write_tiny_gguf(tmp_path / "src" / f"tiny-{arch}.gguf", arch)
    cfg, params = models.load_pretrained(path.parent)  # the directory holding one .gguf
    assert (cfg.model_type, cfg.n_kv_heads, cfg.tie_embeddings, cfg.qkv_bias) == (arch, 2, arch == "qwen2",
                                                                                  arch == "qwen2")
    want = hf_logits(hf_gguf_model(path), TINY_IDS, TINY_MASK)
    ours = np.asarray(_forward(cfg, params, jnp.asarray(TINY_IDS), jnp.asarray(TINY_MASK)))
    assert rel_err(ours, want, TINY_MASK) < 1e-5
    # Without undoing the permutation, llama's logits would differ (the check has teeth).
    if arch == "llama":
        bad = dict(params, layers=dict(params["layers"], attn=dict(params["layers"]["attn"])))
        q = np.asarray(params["layers"]["attn"]["q"]["kernel"])  # (L, D, H, E)
        bad["layers"]["attn"]["q"] = {"kernel": jnp.asarray(q[..., np.r_[0:16:2, 1:16:2]])}
        assert rel_err(np.asarray(_forward(cfg, bad, jnp.asarray(TINY_IDS), jnp.asarray(TINY_MASK))), want,
                       TINY_MASK) > 1e-3
    out = tmp_path / "hf"
    assert convert_main([str(path), str(out)]) == 0
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    assert rel_err(hf_logits(converted, TINY_IDS, TINY_MASK), want, TINY_MASK) < 1e-5
    ours_tok, ref_tok = models.load_tokenizer(path), hf_gguf_tokenizer(path)
    for text in ("the cat in a hat", "<s>the</s>"):
        assert ours_tok(text)["input_ids"] == ref_tok(text)["input_ids"] == \
            transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"], text
    assert ours_tok("the")["input_ids"][0] == 1  # add_bos_token
    chat = [{"role": "user", "content": "hi"}]
    assert ours_tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)


# ----------------------------------------------------------------------------------------------
# Errors


def test_unsupported_quantisation_type_names_type_tensor_and_file(tmp_path):
    rows, row_bytes = 2 * 16, 64 // 32 * 40  # Q8_1: 32 values in 40 bytes; gguf cannot dequantise it
    raw = {"blk.0.attn_k.weight": (np.zeros((rows, row_bytes), np.uint8), T.Q8_1)}
    path = write_tiny_gguf(tmp_path / "q81.gguf", raw=raw)
    with pytest.raises(ValueError, match=r"q81\.gguf.*'blk\.0\.attn_k\.weight'.*Q8_1"):
        models.load_pretrained(path)


def test_unsupported_architecture_names_it_and_the_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", "falcon")
    with pytest.raises(ValueError, match=r"falcon\.gguf.*architecture 'falcon'"):
        models.load_pretrained(path)


def test_unsupported_tokenizer_model_names_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"spm\.gguf.*tokenizer model 'llama'"):
        models.load_tokenizer(path)


def test_ambiguous_directories_name_the_files(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes())
    for load in (models.load_pretrained, models.load_tokenizer):
        with pytest.raises(ValueError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
            load(tmp_path)
    (tmp_path / "b.gguf").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"both a\.gguf and safetensors weights \(model\.safetensors\)"):
        models.load_pretrained(tmp_path)


def test_a_file_that_is_not_gguf_names_the_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        models.load_pretrained(tmp_path / "junk.gguf")


def test_convert_refuses_a_non_empty_directory(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out: exists and is not empty"):
        convert_gguf(path, tmp_path / "out")


def test_workflow_load_lm_reads_a_gguf(tmp_path):
    from rlhf_jax import cli, model_io  # noqa: PLC0415

    path = write_tiny_gguf(tmp_path / "m.gguf")
    cfg, params, tokenizer = model_io.load_lm(cli.ModelArgs(path=str(path), compute_dtype="bfloat16"))
    assert (cfg.model_type, cfg.vocab_size, cfg.compute_dtype) == ("llama", TINY["V"], np.dtype(jnp.bfloat16))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
