"""Centralized adapter training on a real data set: the reference point for every federated figure.

Trains each variant of a TOML config (adapter layouts, head-only, full fine-tuning) on the same training
subset with the same seed, evaluates on the full dev set, prints a table and writes
`<results_dir>/<run_name>/{config.toml,results.json}`.

    python simulations/centralized.py configs/centralized/sst2.toml [--set train.epochs=1] [--only houlsby-m16]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import load_or_explain, output_dir, parse_args, select

from fed_adapters.adapters import AdapterConfig, add_adapter, freeze_base, trainable_parameters
from fed_adapters.configuration import ConfigError, load_toml, to_toml
from fed_adapters.data import TextColumns, held_out_subset, load_split, make_loader, tokenize_dataset
from fed_adapters.modeling import DEFAULT_MODEL, load_model, load_tokenizer
from fed_adapters.provenance import environment
from fed_adapters.training import Optimization, evaluate, seed_everything, train

METHODS = ("adapter", "head", "full")


@dataclass
class DataSection:
    source: str
    data_root: str | None = None
    subset: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    train_size: int | None = None
    eval_size: int | None = None
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    num_labels: int = 2
    max_length: int = 128


@dataclass
class TrainSection(Optimization):
    epochs: float = 2.0


@dataclass
class Variant:
    name: str
    method: str = "adapter"
    adapter: dict | None = None  # AdapterConfig fields, or {preset = "houlsby", ...}
    lr: float | None = None  # overrides train.lr for this variant

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"variant {self.name!r}: unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.method == "adapter":
            AdapterConfig.from_dict(self.adapter or {})  # validate now, not after an hour of other variants


@dataclass
class CentralizedConfig:
    data: DataSection
    variants: list[Variant]
    model: str = DEFAULT_MODEL
    pooling: str = "mean"
    seed: int = 0
    results_dir: str = "results/centralized"
    run_name: str = "run"
    train: TrainSection = field(default_factory=TrainSection)


def variant_rates(variant: Variant) -> dict:
    """A variant's own `lr` is its rate for every parameter it trains (the head's too: a head-only variant's
    whole point), overriding `train.head_lr`."""
    return {"lr": variant.lr, "head_lr": None} if variant.lr else {}


def run_variant(config: CentralizedConfig, variant: Variant, train_set, eval_set, tokenizer) -> dict:
    seed_everything(config.seed)
    model = load_model(config.model, num_labels=config.data.num_labels, pooling=config.pooling)
    if variant.method == "adapter":
        add_adapter(model, AdapterConfig.from_dict(variant.adapter or {}))
    elif variant.method == "head":
        freeze_base(model, train_head=True)
    counts = trainable_parameters(model)
    t = config.train
    loader = make_loader(train_set, tokenizer, t.batch_size, shuffle=True, seed=config.seed)
    stats = train(model, loader, epochs=t.epochs, progress=True, **{**t.train_kwargs(), **variant_rates(variant)})
    metrics = evaluate(model, make_loader(eval_set, tokenizer, t.eval_batch_size), device=t.device, amp=t.amp)
    return {
        "variant": variant.name,
        "method": variant.method,
        "adapter": variant.adapter,
        "lr": variant.lr or t.lr,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "eval_loss": metrics["loss"],
        "eval_examples": int(metrics["num_examples"]),
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.percent,
        "train_loss": stats.loss,
        "train_steps": stats.steps,
        "train_examples": stats.examples,
        "train_seconds": stats.seconds,
        "train_examples_per_second": stats.examples_per_second,
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'variant':<16} {'acc %':>6} {'F1 %':>6} {'trainable %':>11} {'train ex/s':>10} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<16} {100 * r['accuracy']:>6.2f} {100 * r['macro_f1']:>6.2f} {r['trainable_percent']:>11.3f} "
            f"{r['train_examples_per_second']:>10.1f} {r['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/centralized/sst2.toml", argv,
                      ("--only", dict(default=None, help="comma-separated variant names to run")))
    config = load_or_explain(lambda path, overrides: load_toml(path, CentralizedConfig, overrides), args)
    if config is None:
        return 2
    wanted = select(args.only, [v.name for v in config.variants], "variant")
    if wanted is None:
        return 2
    variants = [v for v in config.variants if v.name in wanted]

    seed_everything(config.seed)
    d = config.data
    columns = TextColumns(d.text, d.text_pair, d.label)
    tokenizer = load_tokenizer(config.model)
    train_raw = load_split(d.source, d.train_split, d.data_root, d.subset).shuffle(seed=config.seed)
    eval_raw = held_out_subset(load_split(d.source, d.eval_split, d.data_root, d.subset), d.eval_size or 0)
    if d.train_size:
        train_raw = train_raw.select(range(min(d.train_size, len(train_raw))))
    train_set = tokenize_dataset(train_raw, tokenizer, columns, d.max_length, d.num_labels)
    eval_set = tokenize_dataset(eval_raw, tokenizer, columns, d.max_length, d.num_labels)

    out = output_dir(Path(config.results_dir) / config.run_name, to_toml(dataclasses.asdict(config)))
    rows = []
    started = time.time()
    for variant in variants:
        print(f"== {variant.name} ({variant.method})", flush=True)
        rows.append(run_variant(config, variant, train_set, eval_set, tokenizer))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        _write_results(out, config, rows, len(train_set), len(eval_set), started)
    print()
    print(format_table(rows))
    print(f"\nwrote {out / 'results.json'}")
    return 0


def _write_results(out: Path, config: CentralizedConfig, rows: list[dict], n_train: int, n_eval: int, started: float) -> None:
    payload = {
        "benchmark": "centralized",
        "config": dataclasses.asdict(config),
        "train_examples": n_train,
        "eval_examples": n_eval,
        "results": rows,
        "seconds": time.time() - started,
        "environment": {**environment(), "device": config.train.device},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
