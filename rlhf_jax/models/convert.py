"""A GGUF file as a Hugging Face directory, loadable offline by transformers and by rlhf_jax:

    python -m rlhf_jax.models.convert SmolLM2-135M-Instruct.Q4_1.gguf out_dir [--dtype bfloat16]

writes ``config.json`` + ``model.safetensors`` (``models.save_pretrained``: dequantised weights in the
Hugging Face layout), ``generation_config.json`` (bos/eos/pad) and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, the chat template), then prints what it wrote.
``AutoModelForCausalLM.from_pretrained(out_dir)`` / ``AutoTokenizer.from_pretrained(out_dir)`` read them.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

import jax.numpy as jnp

from rlhf_jax.models import gguf
from rlhf_jax.models.hf_io import check_tokenizer, load_pretrained, save_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def convert_gguf(gguf_path: str | pathlib.Path, out_dir: str | pathlib.Path, dtype: Any = jnp.float32) -> list[pathlib.Path]:
    """Write the Hugging Face directory of ``gguf_path`` (a .gguf file, or a directory holding one) to
    ``out_dir`` (created; must be empty if it exists) and return the files written."""
    source = gguf.find_gguf(gguf_path)
    if source is None:
        raise ValueError(f"{gguf_path}: not a .gguf file, nor a directory holding one")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to mix files into it")
    cfg, params = load_pretrained(source, dtype=dtype)
    tokenizer = gguf.gguf_tokenizer(source)
    check_tokenizer(cfg, tokenizer, source=str(source))
    save_pretrained(out_dir, cfg, params)
    eos = cfg.eos_token_ids
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
                  "pad_token_id": cfg.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None},
                                                               indent=2) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=pathlib.Path, help="the .gguf file (or a directory holding exactly one)")
    parser.add_argument("out_dir", type=pathlib.Path, help="the Hugging Face directory to write (new or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    args = parser.parse_args(argv)
    files = convert_gguf(args.gguf, args.out_dir, dtype=DTYPES[args.dtype])
    print(f"wrote {args.out_dir} from {args.gguf}:")
    for f in files:
        print(f"  {f.name:28s} {f.stat().st_size:>14,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
