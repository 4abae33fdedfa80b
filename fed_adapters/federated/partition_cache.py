"""A partition kept on disk beside the data set it splits, so that a run partitions once, not once per process.

The server partitions first (for partition.json) and every Ray actor then reads the clients' row numbers
here, instead of importing flwr-datasets (which imports seaborn and scipy: about a second) and drawing the
same split again. The file is named by everything the split depends on, so another data set, setting, seed,
flwr-datasets or datasets version never reads it; a missing, unreadable or unwritable file only means computing.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import datasets
import numpy as np

FORMAT = 1  # bump when the stored layout changes or partition.py draws a split differently


def cache_path(dataset: datasets.Dataset, settings: object) -> Path | None:
    """Where `dataset`'s partition under `settings` (JSON-able) lives; None for a data set only in memory."""
    if not dataset.cache_files:
        return None
    # A fingerprint names a data set's recipe, not its rows: another `datasets` could shuffle differently under it.
    identity = [FORMAT, dataset._fingerprint, len(dataset), settings, version("flwr-datasets"), version("datasets")]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(dataset.cache_files[0]["filename"]).parent / f"fed_adapters-partition-{digest}.npz"


def cached_rows(dataset: datasets.Dataset, settings: object,
                compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
    """Each client's row numbers in `dataset`: read from the cache, or computed and stored there."""
    path = cache_path(dataset, settings)
    rows = _read(path) if path else None
    if rows is None:
        rows = compute()
        if path:
            _write(path, rows)
    return rows


def _read(path: Path) -> list[np.ndarray] | None:
    try:
        with np.load(path) as stored:
            return [stored[f"client_{i}"] for i in range(len(stored.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: partition again (and overwrite it)


def _write(path: Path, rows: list[np.ndarray]) -> None:
    """Written under a temporary name and renamed, so a process reading concurrently sees all or nothing."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            np.savez(file, **{f"client_{i}": np.asarray(r, dtype=np.int64) for i, r in enumerate(rows)})
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)  # a read-only cache directory: every process partitions, as without one
