"""Start-up without what a run never uses: loading the embedded default's or an export's tokenizer does not import
torch (seconds per script start), and the tokenizer it returns is the one ``AutoTokenizer`` builds.

``models.load_tokenizer`` builds ``PreTrainedTokenizerFast`` directly when ``tokenizer_config.json`` names the plain
class; every other class still goes through ``AutoTokenizer``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers
from smollm2 import smollm2_gguf

from rlhf_jax import models
from rlhf_jax.data import embedded

TEXTS = ["Customer: My order 1234 has not arrived yet.\nAgent: I'm sorry", "héllo wörld 42", ""]
CHAT = [{"role": "user", "content": "Where is my parcel?"}, {"role": "assistant", "content": "On its way."},
        {"role": "user", "content": "Thanks"}]


def _same_tokenizer(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    for field in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side", "model_max_length", "chat_template"):
        assert getattr(ours, field) == getattr(theirs, field), field
    batch = {"padding": True, "return_tensors": "np"}
    for a, b in zip(ours(TEXTS, **batch).values(), theirs(TEXTS, **batch).values()):
        assert (a == b).all()
    assert ours.decode(ours("héllo wörld")["input_ids"]) == theirs.decode(theirs("héllo wörld")["input_ids"])
    if ours.chat_template:
        assert (ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
                == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF) saved as a Hugging Face directory, as the scripts' exports save it."""
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    models.load_tokenizer(smollm2_gguf()).save_pretrained(out)
    return out


@pytest.mark.parametrize("which", ["embedded", "smollm2"])
def test_a_plain_tokenizer_directory_loads_as_autotokenizer_loads_it(which, request):
    path = embedded.embedded_dir() if which == "embedded" else request.getfixturevalue("smollm2_dir")
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] in \
        models.hf_io.PLAIN_TOKENIZER_CLASSES  # the fast path is the one taken
    _same_tokenizer(models.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path))


def test_another_tokenizer_class_still_goes_through_autotokenizer(tmp_path, monkeypatch):
    """A directory naming a model-specific class is not built as the plain class."""
    path = embedded.build(tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    tok = models.load_tokenizer(path)
    assert calls == [(str(path),)]
    assert type(tok) is type(real(str(path)))


def test_the_embedded_default_loads_without_importing_torch():
    """A script on the embedded default (the model and its tokenizer) never imports torch: each script start
    would otherwise spend seconds on it."""
    code = ("import sys; from rlhf_jax import model_io; from rlhf_jax.cli import ModelArgs; "
            "cfg, params, tok = model_io.load_lm(ModelArgs()); print(len(tok), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    n, torch_loaded = proc.stdout.split()
    assert int(n) > 100 and torch_loaded == "False", proc.stdout
