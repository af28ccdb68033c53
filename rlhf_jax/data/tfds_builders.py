"""TFDS datasets built from local feedback files (array_record; no TensorFlow needed).

:func:`build_tfds` validates a canonical file (or a public layout, see :mod:`rlhf_jax.data.readers`)
and writes it as a TFDS dataset ``<data_dir>/<name>/1.0.0``, in file order. :func:`load_source`
is what scripts call: it accepts a file path or ``"tfds:<name>"`` (+ ``data_dir``) and returns the
same rows either way::

    build_tfds("pairwise", "prefs.jsonl", data_dir="~/tfds", name="my_prefs")
    rows = load_source("tfds:my_prefs", "pairwise", data_dir="~/tfds")   # == load_rows("prefs.jsonl", "pairwise")

Features (one builder per kind): ``prompt`` (text; "" when the prompt is a conversation) and
``prompt_messages`` (``{role, content}`` sequence; empty when the prompt is text), plus
``completion`` (sft), ``chosen``/``rejected``/``margin`` (pairwise; margin as text, "" = none, so
that float64 values survive exactly), ``responses``/``ranking`` (ranked), ``completion``/``label``
(binary); prompt datasets have only the two prompt features.
"""
from __future__ import annotations

import os
import re
import types
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.formats import KINDS, Kind, Row, check_kind, load_rows, parse_row, row_to_dict
from rlhf_jax.data.readers import Layout, read_public
from rlhf_jax.data.validation import ValidationReport

_text = tfds.features.Text
_FEATURES: dict[Kind, dict[str, Any]] = {
    "sft": {"completion": _text()},
    "pairwise": {"chosen": _text(), "rejected": _text(), "margin": _text()},
    "ranked": {"responses": tfds.features.Sequence(_text()), "ranking": tfds.features.Sequence(np.int64)},
    "binary": {"completion": _text(), "label": np.bool_},
    "prompt": {},
}


def _features(kind: Kind) -> tfds.features.FeaturesDict:
    messages = tfds.features.Sequence({"role": _text(), "content": _text()})
    return tfds.features.FeaturesDict({"prompt": _text(), "prompt_messages": messages, **_FEATURES[kind]})


def _to_example(row: Row) -> dict[str, Any]:
    record = row_to_dict(row)
    prompt = record.pop("prompt")
    text, turns = (prompt, []) if isinstance(prompt, str) else ("", prompt)
    if "chosen" in record:
        record["margin"] = repr(record["margin"]) if "margin" in record else ""
    return {"prompt": text, "prompt_messages": {"role": [m["role"] for m in turns], "content": [m["content"] for m in turns]},
            **record}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, np.ndarray)):
        return [_decode(x) for x in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_example(example: Mapping[str, Any], kind: Kind, source: str) -> Row:
    record = {k: _decode(x) for k, x in example.items() if k != "prompt_messages"}
    turns = example["prompt_messages"]
    record["prompt"] = record["prompt"] or [{"role": _decode(r), "content": _decode(c)}
                                            for r, c in zip(turns["role"], turns["content"])]
    if kind == "pairwise":
        record["margin"] = float(record["margin"]) if record["margin"] else None
    return parse_row(record, kind, source)


class RowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: ``sources`` maps split name -> local file. Subclassed per kind and name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Built from local files by rlhf_jax."}
    kind: ClassVar[Kind]

    def __init__(self, *, sources: Mapping[str, str], layout: Layout | Literal["canonical"] = "canonical",
                 skip_invalid: bool = False, report: ValidationReport | None = None, **kwargs: Any):
        self.sources, self.layout, self.skip_invalid, self.report = dict(sources), layout, skip_invalid, report
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(self.kind), disable_shuffling=True,
                                     description=f"rlhf_jax {self.kind} rows from {self.sources}")

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {split: self._generate_examples(path) for split, path in self.sources.items()}

    def _generate_examples(self, path: str):
        rows = load_file(path, self.kind, layout=self.layout, skip_invalid=self.skip_invalid, report=self.report)
        for i, row in enumerate(rows):
            yield i, _to_example(row)


class SFTBuilder(RowsBuilder, skip_registration=True):
    name = "rlhf_sft"
    kind = "sft"


class PairwiseBuilder(RowsBuilder, skip_registration=True):
    name = "rlhf_pairwise"
    kind = "pairwise"


class RankedBuilder(RowsBuilder, skip_registration=True):
    name = "rlhf_ranked"
    kind = "ranked"


class BinaryBuilder(RowsBuilder, skip_registration=True):
    name = "rlhf_binary"
    kind = "binary"


class PromptBuilder(RowsBuilder, skip_registration=True):
    name = "rlhf_prompt"
    kind = "prompt"


BUILDERS: dict[Kind, type[RowsBuilder]] = {"sft": SFTBuilder, "pairwise": PairwiseBuilder, "ranked": RankedBuilder,
                                           "binary": BinaryBuilder, "prompt": PromptBuilder}


def load_file(path: str | os.PathLike, kind: Kind, *, layout: Layout | Literal["canonical", "auto"] = "canonical",
              skip_invalid: bool = False, report: ValidationReport | None = None) -> list[Row]:
    """A canonical file (``layout="canonical"``) or a public layout (see :func:`read_public`)."""
    if layout == "canonical":
        return load_rows(path, kind, skip_invalid=skip_invalid, report=report)
    return read_public(path, layout, kind, skip_invalid=skip_invalid, report=report)  # type: ignore[arg-type]


def build_tfds(
    kind: Kind,
    source_path: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    name: str | None = None,
    *,
    layout: Layout | Literal["canonical", "auto"] = "canonical",
    skip_invalid: bool = False,
    report: ValidationReport | None = None,
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
    """Build TFDS dataset ``name`` (default ``rlhf_<kind>``) from a file, or ``{split: file}``
    (a single file becomes split ``"train"``). Rows are validated as by :func:`load_rows`.

    An existing dataset of that name and version raises ``FileExistsError`` unless ``overwrite``.
    """
    base = BUILDERS[check_kind(kind)]
    name = name or base.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"TFDS dataset name {name!r} must be snake_case: [a-z][a-z0-9_]*")
    sources = {"train": source_path} if isinstance(source_path, (str, os.PathLike)) else dict(source_path)
    cls = types.new_class(name, (base,), {"skip_registration": True}, lambda ns: ns.update(name=name))
    builder = cls(sources={split: os.fspath(p) for split, p in sources.items()}, layout=layout,
                  skip_invalid=skip_invalid, report=report, data_dir=os.path.expanduser(os.fspath(data_dir)))
    if builder.is_prepared() and not overwrite:
        raise FileExistsError(f"{builder.data_dir} exists; pass overwrite=True to rebuild it")
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


def _kind_of(features: tfds.features.FeaturesDict) -> Kind:
    keys = set(features.keys()) - {"prompt", "prompt_messages"}
    for kind in KINDS:
        if keys == set(_FEATURES[kind]):
            return kind
    raise ValueError(f"not an rlhf_jax dataset: features {sorted(features.keys())}")


def load_tfds(name: str, kind: Kind, *, data_dir: str | os.PathLike | None = None, split: str = "train") -> list[Row]:
    """All rows of split ``split`` of a dataset made by :func:`build_tfds` (``name`` may carry
    ``:version``)."""
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.path.expanduser(os.fspath(data_dir)))
    stored = _kind_of(builder.info.features)
    if stored != check_kind(kind):
        raise ValueError(f"tfds:{name} holds {stored} rows, not {kind}")
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(list(range(len(source))))
    return [_from_example(example, kind, f"tfds:{name}/{split}[{i}]") for i, example in enumerate(examples)]


def load_source(
    spec: str | os.PathLike,
    kind: Kind,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    layout: Layout | Literal["canonical", "auto"] = "canonical",
    skip_invalid: bool = False,
    report: ValidationReport | None = None,
) -> list[Row]:
    """Rows from ``"tfds:<name>"`` (read from ``data_dir``, split ``split``) or from a file path
    (``layout`` as in :func:`load_file`). What scripts pass their ``--data`` argument to."""
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        return load_tfds(spec.removeprefix("tfds:"), kind, data_dir=data_dir, split=split)
    return load_file(spec, kind, layout=layout, skip_invalid=skip_invalid, report=report)
