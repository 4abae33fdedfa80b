"""Predictions from a saved adapter (or adapter set) for a JSONL file of texts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .adapters import load_adapter
from .adapters.state import read_adapter_metadata
from .data import DataError
from .modeling import load_model, load_tokenizer
from .training import resolve_device


def read_jsonl(path: Path, columns: list[str]) -> list[dict]:
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+2029 or U+0085 raw, which splitlines breaks on.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON ({error}); every line must be one JSON object") from None
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise DataError(f"{path}:{number} lacks column(s) {missing}; name the text column(s) with --text / --text-pair")
        not_text = [c for c in columns if not isinstance(row[c], str)]
        if not_text:
            raise DataError(f"{path}:{number}: column(s) {not_text} must hold text, got "
                            f"{', '.join(type(row[c]).__name__ for c in not_text)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


@torch.no_grad()
def predict_file(adapter_dir: str | Path, input_path: str | Path, output_path: str | Path, model_name: str | None = None,
                 text: str = "text", text_pair: str | None = None, batch_size: int = 64, max_length: int = 128,
                 device: str = "auto", overwrite: bool = False) -> int:
    """Writes one JSONL line per input line (its fields, `prediction` and `probabilities`); returns the count."""
    output_path = Path(output_path)
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} exists; choose another --output or pass --overwrite")
    for option, value in (("--batch-size", batch_size), ("--max-length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{option} must be a whole number >= 1, got {value!r}")
    target = resolve_device(device)  # before anything loads
    metadata = read_adapter_metadata(adapter_dir)
    if not metadata["includes_head"]:
        raise DataError(f"the adapter in {adapter_dir} holds no classification head, so its predictions would come "
                        "from a random one; save it again with save_adapter or save_adapter_set, which keep the head")
    base = metadata["base_model"]
    name = model_name or base["name_or_path"]
    if not name:
        raise DataError(f"the adapter in {adapter_dir} does not record its base model; pass --model")
    rows = read_jsonl(Path(input_path), [text] + ([text_pair] if text_pair else []))
    model = load_model(name, num_labels=base["num_labels"], pooling=base.get("pooling", "mean"))
    load_adapter(model, adapter_dir)
    tokenizer = load_tokenizer(name)
    model.to(target).eval()
    lines = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pairs = [r[text_pair] for r in chunk] if text_pair else None
        batch = tokenizer([r[text] for r in chunk], pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probabilities = model(**{k: v.to(target) for k, v in batch.items()}).logits.float().softmax(-1).cpu()
        for row, p in zip(chunk, probabilities):
            lines.append(json.dumps({**row, "prediction": int(p.argmax()), "probabilities": [round(float(x), 6) for x in p]}))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, output_path)
    return len(lines)
