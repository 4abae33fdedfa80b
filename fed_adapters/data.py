"""Reading text data sets (local JSONL/CSV/Parquet or a Hub id) and turning them into padded batches."""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, PreTrainedTokenizerBase

DATA_ROOT_ENV = "FED_ADAPTERS_DATA_ROOT"
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

datasets.disable_progress_bars()


class DataError(ValueError):
    """A data source, split or column is wrong; the message names it and what is available."""


@dataclass(frozen=True)
class TextColumns:
    """Which columns hold the text, the optional second text of a pair, and the integer label."""

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"


def resolve_source(source: str, data_root: str | os.PathLike | None = None) -> Path | str:
    """A local path for `source` (as given, or under the data root), else `source` itself as a Hub id.

    The data root comes from the argument or from the FED_ADAPTERS_DATA_ROOT environment variable.
    """
    root = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    candidates = [Path(source).expanduser()]
    if root and not Path(source).is_absolute():
        candidates.insert(0, Path(root).expanduser() / source)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return source


HELD_OUT_SEED = 0  # one held-out subset for every run and seed: federated and centralized figures compare


def held_out_subset(dataset: datasets.Dataset, size: int) -> datasets.Dataset:
    """`size` examples drawn at random (fixed seed) from a held-out split, or all of it for 0: the first rows of
    a file ordered by domain or label (Amazon's test split starts with 1,000 book reviews) are no fair sample."""
    if not size:
        return dataset
    return dataset.shuffle(seed=HELD_OUT_SEED).select(range(min(size, len(dataset))))


def load_split(
    source: str, split: str, data_root: str | os.PathLike | None = None, subset: str | None = None
) -> datasets.Dataset:
    """One split of a data set: a file, a folder holding `<split>.{jsonl,csv,parquet}`, or a Hub id."""
    resolved = resolve_source(source, data_root)
    if isinstance(resolved, Path):
        return _load_local(resolved, split)
    try:
        return datasets.load_dataset(resolved, subset, split=split)
    except Exception as error:
        raise DataError(
            f"cannot load data set {source!r} (split {split!r}) as a local path or from the Hugging Face Hub: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Give an existing file or "
            f"folder, or set the data root (data_root / {DATA_ROOT_ENV}) to the folder that holds it"
        ) from None


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir():
        files = [path / f"{split}{suffix}" for suffix in _FORMATS if (path / f"{split}{suffix}").is_file()]
        if not files:
            available = sorted(p.name for p in path.iterdir() if p.suffix in _FORMATS)
            raise DataError(f"no file for split {split!r} in {path}; it holds {available or 'no data files'}")
        path = files[0]
    builder = _FORMATS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def check_columns(dataset: datasets.Dataset, columns: TextColumns, need_label: bool = True) -> None:
    wanted = [columns.text] + ([columns.text_pair] if columns.text_pair else []) + ([columns.label] if need_label else [])
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(f"column(s) {missing} not in the data set; it has {dataset.column_names}. Set the column names to match")
    for column in filter(None, (columns.text, columns.text_pair)):
        kind = getattr(dataset.features[column], "dtype", None)
        if kind not in ("string", "large_string"):
            raise DataError(f"text column {column!r} holds {dataset.features[column]}, not text; name the text column "
                            "(data.text / data.text_pair) or store the texts as strings")
        empty = dataset.with_format("arrow")[column].null_count  # Arrow's count, over exactly these rows
        if empty:
            raise DataError(f"text column {column!r} has {empty} missing value(s) (null / an empty CSV cell); "
                            "fill them (e.g. with \"\") or drop those rows")


def check_labels(dataset: datasets.Dataset, label: str, num_labels: int) -> None:
    values = dataset[label]
    not_ids = list(dict.fromkeys(repr(x) for x in values if isinstance(x, bool) or not isinstance(x, int)))
    if not_ids:
        raise DataError(
            f"labels in column {label!r} must be integer class ids 0..{num_labels - 1}, got {', '.join(not_ids[:5])}; "
            "map them to integers (e.g. false/true -> 0/1, 'neg'/'pos' -> 0/1)"
        )
    bad = sorted({x for x in values if not 0 <= x < num_labels})
    if bad:
        raise DataError(
            f"labels {bad[:5]} in column {label!r} are outside [0, {num_labels}); "
            "set num_labels to the number of classes or map the labels to 0..num_labels-1"
        )


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    columns: TextColumns = TextColumns(),
    max_length: int = 128,
    num_labels: int | None = None,
    task: str = "classification",
) -> datasets.Dataset:
    """Token ids (truncated, unpadded) plus `labels` for classification; padding happens per batch."""
    classification = task == "classification"
    check_columns(dataset, columns, need_label=classification)
    if classification and num_labels is not None:
        check_labels(dataset, columns.label, num_labels)

    def encode(batch: dict) -> dict:
        pair = batch[columns.text_pair] if columns.text_pair else None
        encoded = tokenizer(batch[columns.text], pair, truncation=True, max_length=max_length)
        if classification:
            encoded["labels"] = batch[columns.label]
        return encoded

    fingerprint = _tokenized_fingerprint(dataset, tokenizer, encode, columns, max_length, task)
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)


def _tokenized_fingerprint(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, encode: Callable,
                           columns: TextColumns, max_length: int, task: str) -> str | None:
    """The tokenized set's identity, from the fast tokenizer's own serialization and the encoding's code.

    Left to itself, `datasets` identifies a map's result by pickling the closure, tokenizer included: about
    0.15 s per call, which was most of the cost of tokenizing a client's shard and is paid per shard per
    process. A slow (Python) tokenizer has no serialization to hash, so `datasets` hashes it as before (None).
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    identity = (dataset._fingerprint, type(tokenizer).__name__, _tokenizer_identity(tokenizer, len(tokenizer)),
                tokenizer.truncation_side, marshal.dumps(encode.__code__), columns, max_length, task)
    return hashlib.sha256(repr(identity).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase, vocabulary_size: int) -> str:
    """A hash of the fast tokenizer's serialization, once per tokenizer (and vocabulary size: added tokens change it);
    parsing it is most of a shard's tokenizing time, and every shard of a process shares the tokenizer."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for per_call in ("truncation", "padding"):  # set by each call; ours come from max_length in the fingerprint
        state.pop(per_call, None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def make_loader(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    task: str = "classification",
) -> DataLoader:
    """Batches padded to their longest member (dynamic padding); shuffling is seeded."""
    if task == "causal_lm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)
