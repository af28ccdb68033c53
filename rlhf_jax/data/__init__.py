"""Feedback data: formats and validation, public-layout readers, TFDS builders, batches, iterator.

``load_source`` (file or ``"tfds:name"``) -> rows -> ``encode`` -> ``collate_*`` via
``BatchIterator`` -> the batch types of :mod:`rlhf_jax.types`.
"""
from rlhf_jax.data.batching import (
    Encoded,
    collate_binary,
    collate_pairs,
    collate_prompts,
    collate_ranked,
    collate_sft,
    encode,
    encode_prompts,
    pack,
    pad_length,
    render,
)
from rlhf_jax.data.formats import (
    KINDS,
    BinaryRow,
    Kind,
    Message,
    PairRow,
    Prompt,
    PromptRow,
    RankRow,
    Row,
    SFTRow,
    load_rows,
    parse_row,
    rank_to_pairs,
    read_records,
    row_to_dict,
    write_rows,
)
from rlhf_jax.data.iterator import BatchIterator
from rlhf_jax.data.readers import LAYOUTS, TLDR_TEMPLATE, detect_layout, read_public
from rlhf_jax.data.tfds_builders import build_tfds, load_file, load_source, load_tfds
from rlhf_jax.data.validation import DataError, ValidationReport

__all__ = [
    "KINDS", "LAYOUTS", "TLDR_TEMPLATE",
    "BatchIterator", "BinaryRow", "DataError", "Encoded", "Kind", "Message", "PairRow", "Prompt", "PromptRow",
    "RankRow", "Row", "SFTRow", "ValidationReport",
    "build_tfds", "collate_binary", "collate_pairs", "collate_prompts", "collate_ranked", "collate_sft",
    "detect_layout", "encode", "encode_prompts", "load_file", "load_rows", "load_source", "load_tfds", "pack",
    "pad_length", "parse_row", "rank_to_pairs", "read_public", "read_records", "render", "row_to_dict", "write_rows",
]
