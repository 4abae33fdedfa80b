"""Federated against centralized over seeds: the paired gaps, their mean and its standard error.

The seed picks the training subset, the data order, the head's initialisation and (federated) the partition,
so a federated run is only comparable with the centralized run at the same seed. Give the run directories of
both sides (`fed-adapters simulate CONFIG --set seed=S`; `python simulations/centralized.py CONFIG --set seed=S`,
or its results.json); the script pairs them by seed, checks that each side is one configuration (only the seed,
the run's name and where its files lie differ) and that both trained on the same data, prints the table and
writes `<out>/<name>.json` and `<name>.png`. A federated run's figure is its final adapter's: after head
calibration when the run calibrated (the last round's is kept beside it).

    python simulations/seed_gaps.py --federated results/NAME_s* --centralized results/centralized/central_s* \\
        --variant houlsby-m16 --target 3 --name NAME_gaps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from centralized import CentralizedConfig  # noqa: E402

from fed_adapters.configuration import ConfigError, from_mapping  # noqa: E402
from fed_adapters.federated.config import load_run_config  # noqa: E402

# What may differ between the runs of one row: which seed, and what the run and its data are called where.
PER_RUN_KEYS = ("seed", "run_name", "results_dir", "data.data_root")


@dataclass
class SeedResult:
    seed: int
    source: str  # the run directory or results file
    accuracy: float  # percent
    eval_loss: float
    settings: dict[str, Any]  # the run's configuration without PER_RUN_KEYS, flattened
    extra: dict[str, Any]


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(config).items() if k not in PER_RUN_KEYS}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); was its run interrupted while writing it?") from None


def federated_result(run_dir: Path) -> SeedResult:
    """A finished `fed-adapters simulate` run: its resolved config and its final adapter's dev-set figures."""
    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "config.toml").is_file() or not metrics_path.is_file():
        raise ConfigError(f"{run_dir} is not a finished federated run (config.toml and metrics.json are written by "
                          "`fed-adapters simulate`)")
    config = load_run_config(run_dir / "config.toml")  # defaults filled in: older runs compare with newer ones
    metrics = read_json(metrics_path)
    last = metrics["rounds"][-1]
    if "accuracy" not in last:
        raise ConfigError(f"{run_dir} has no accuracy (a causal-LM run?); seed gaps compare classification runs")
    final = metrics.get("head_calibration") or last
    extra = {"last_round": {"accuracy": round(100 * last["accuracy"], 2), "eval_loss": round(last["loss"], 4)},
             "train_examples_seen": sum(r.get("train_examples_seen", 0) for r in metrics["rounds"])}
    return SeedResult(config.seed, str(run_dir), 100 * final["accuracy"], final["loss"],
                      settings_of(config.to_dict()), extra)


def centralized_result(path: Path, variant: str) -> SeedResult:
    """One variant of a `simulations/centralized.py` run (its directory or its results.json)."""
    results_path = path / "results.json" if path.is_dir() else path
    if not results_path.is_file():
        raise ConfigError(f"{path} has no results.json (written by simulations/centralized.py)")
    results = read_json(results_path)
    rows = {row["variant"]: row for row in results.get("results", [])}
    if variant not in rows:
        raise ConfigError(f"{results_path} has no variant {variant!r} (it has {', '.join(rows) or 'none'}); "
                          "choose one with --variant")
    # Through the config's own class, so that defaults fill keys an older run did not write.
    row, config = rows[variant], dataclasses.asdict(from_mapping(CentralizedConfig, results["config"]))
    config.pop("variants")  # a run may have trained others as well; this row's own settings follow
    settings = settings_of({**config, "variant": {k: row[k] for k in ("variant", "method", "adapter", "lr")}})
    return SeedResult(int(config["seed"]), str(path), 100 * row["accuracy"], row["eval_loss"], settings,
                      {"train_examples_seen": row["train_examples"]})


def one_configuration(side: str, results: list[SeedResult]) -> None:
    """Every run of a side has the first run's settings and a seed of its own, or a ConfigError names the difference."""
    first = results[0]
    for other in results[1:]:
        differing = sorted(k for k in first.settings.keys() | other.settings.keys()
                           if first.settings.get(k) != other.settings.get(k))
        if differing:
            key = differing[0]
            raise ConfigError(f"{side} runs differ in {key} ({first.settings.get(key)!r} in {first.source}, "
                              f"{other.settings.get(key)!r} in {other.source}); a row compares one configuration "
                              "over seeds" + (f" ({len(differing)} keys differ)" if len(differing) > 1 else ""))
    seeds = [r.seed for r in results]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{side} runs repeat seed {repeated[0]} "
                          f"({', '.join(r.source for r in results if r.seed == repeated[0])}); give one run per seed")


def same_data(federated: SeedResult, centralized: SeedResult) -> None:
    """Both sides trained on the same examples (source, subset, split, size, columns, truncation; no federated
    example held back for local tests) and were judged on the same split."""
    if federated.settings.get("partition.local_test_fraction"):
        raise ConfigError(f"the federated runs hold back partition.local_test_fraction = "
                          f"{federated.settings['partition.local_test_fraction']} of each client's examples for local "
                          "tests: they train on fewer examples than the centralized runs; compare runs with 0")
    pairs = [("data.source", "data.source"), ("data.subset", "data.subset"), ("data.train_split", "data.train_split"),
             ("data.train_size", "data.train_size"), ("data.test_split", "data.eval_split"),
             ("data.test_size", "data.eval_size"), ("data.text", "data.text"), ("data.text_pair", "data.text_pair"),
             ("data.label", "data.label"), ("model.max_length", "data.max_length"), ("model.name", "model")]
    for fed_key, cen_key in pairs:
        fed_value, cen_value = federated.settings.get(fed_key), centralized.settings.get(cen_key)
        if (fed_value or None) != (cen_value or None):
            raise ConfigError(f"the federated runs have {fed_key} = {fed_value!r} but the centralized ones "
                              f"{cen_key} = {cen_value!r}: a gap needs both trained and judged on the same data")


def pair(federated: list[SeedResult], centralized: list[SeedResult]) -> list[tuple[SeedResult, SeedResult]]:
    for side, results in (("federated", federated), ("centralized", centralized)):
        one_configuration(side, results)
    same_data(federated[0], centralized[0])
    by_seed = {r.seed: r for r in centralized}
    unpaired = sorted({r.seed for r in federated} ^ set(by_seed))
    if unpaired:
        seed = unpaired[0]
        has, lacks = ("federated", "centralized") if seed not in by_seed else ("centralized", "federated")
        raise ConfigError(f"seed {seed} has a {has} run but no {lacks} one; give its {lacks} run or leave the seed out")
    return [(f, by_seed[f.seed]) for f in sorted(federated, key=lambda r: r.seed)]


def summarize(pairs: list[tuple[SeedResult, SeedResult]], target: float | None) -> dict[str, Any]:
    gaps = [f.accuracy - c.accuracy for f, c in pairs]
    n = len(gaps)
    mean_gap = round(statistics.fmean(gaps), 2)
    return {
        "seeds": [f.seed for f, _ in pairs],
        "federated_accuracy": round(statistics.fmean(f.accuracy for f, _ in pairs), 2),
        "centralized_accuracy": round(statistics.fmean(c.accuracy for _, c in pairs), 2),
        "mean_gap": mean_gap,
        # Of the paired gaps: the seed's own luck (subset, order, initialisation) cancels within a pair.
        "gap_standard_error": round(statistics.stdev(gaps) / n ** 0.5, 2) if n > 1 else None,
        "federated_eval_loss": round(statistics.fmean(f.eval_loss for f, _ in pairs), 4),
        "centralized_eval_loss": round(statistics.fmean(c.eval_loss for _, c in pairs), 4),
        # "Within `target` points of centralized", judged on the mean gap as quoted (two decimals).
        **({"target": target, "target_met": mean_gap >= -target} if target is not None else {}),
    }


def format_table(pairs: list[tuple[SeedResult, SeedResult]], summary: dict[str, Any]) -> str:
    header = f"{'seed':>4} {'federated %':>11} {'centralized %':>13} {'gap':>6} {'fed loss':>8} {'cen loss':>8}"
    lines = [header, "-" * len(header)]
    for f, c in pairs:
        lines.append(f"{f.seed:>4} {f.accuracy:>11.2f} {c.accuracy:>13.2f} {f.accuracy - c.accuracy:>+6.2f} "
                     f"{f.eval_loss:>8.4f} {c.eval_loss:>8.4f}")
    se = summary["gap_standard_error"]
    lines.append("-" * len(header))
    lines.append(f"{'mean':>4} {summary['federated_accuracy']:>11.2f} {summary['centralized_accuracy']:>13.2f} "
                 f"{summary['mean_gap']:>+6.2f} {summary['federated_eval_loss']:>8.4f} {summary['centralized_eval_loss']:>8.4f}"
                 + (f"   (gap ± {se:.2f} standard error over {len(pairs)} seeds)" if se is not None else ""))
    if "target" in summary:
        unit = "point" if summary["target"] == 1 else "points"
        lines.append(f"target: within {summary['target']:g} {unit} of centralized on the mean: "
                     + ("met" if summary["target_met"] else "missed"))
    return "\n".join(lines)


def plot(pairs: list[tuple[SeedResult, SeedResult]], summary: dict[str, Any], title: str, path: Path) -> None:
    seeds = [f.seed for f, _ in pairs]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(pairs) + 2), 4), dpi=120)
    ax.vlines(seeds, [f.accuracy for f, _ in pairs], [c.accuracy for _, c in pairs], color="0.75", zorder=1)
    ax.scatter(seeds, [c.accuracy for _, c in pairs], marker="s", label="centralized", zorder=2)
    ax.scatter(seeds, [f.accuracy for f, _ in pairs], marker="o", label="federated", zorder=2)
    se = summary["gap_standard_error"]
    ax.set_title(f"{title}\nmean gap {summary['mean_gap']:+.2f}" + (f" ± {se:.2f}" if se is not None else "")
                 + f" points over {len(pairs)} seeds", fontsize=10)
    ax.set_xlabel("seed")
    ax.set_ylabel("dev accuracy %")
    ax.set_xticks(seeds)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(pairs: list[tuple[SeedResult, SeedResult]], summary: dict[str, Any], args: argparse.Namespace,
                  command: str) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    federated, centralized = pairs[0]
    payload = {
        "benchmark": "seed_gaps",
        "command": command,
        "summary": summary,
        "runs": [{"seed": f.seed, "federated": {"accuracy": round(f.accuracy, 2), "eval_loss": round(f.eval_loss, 4),
                                                "run": f.source, **f.extra},
                  "centralized": {"accuracy": round(c.accuracy, 2), "eval_loss": round(c.eval_loss, 4), "run": c.source,
                                  **c.extra},
                  "gap": round(f.accuracy - c.accuracy, 2)} for f, c in pairs],
        # The runs' shared settings (each run's own config.toml holds the rest).
        "federated_settings": federated.settings,
        "centralized_settings": centralized.settings,
    }
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    plot(pairs, summary, args.name, out / f"{args.name}.png")
    return path


def points(text: str) -> float:
    """argparse type: a gap allowed, in accuracy points (0 or more)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of points >= 0 (e.g. 3)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federated", nargs="+", required=True, metavar="RUN_DIR",
                        help="run directories of `fed-adapters simulate`, one per seed")
    parser.add_argument("--centralized", nargs="+", required=True, metavar="RUN",
                        help="simulations/centralized.py run directories (or their results.json), one per seed")
    parser.add_argument("--variant", default="houlsby-m16", help="the centralized variant to compare with")
    parser.add_argument("--name", default="seed_gaps", help="name of the JSON and PNG written")
    parser.add_argument("--target", type=points, default=None, metavar="POINTS",
                        help="the gap allowed (e.g. 3: federated within 3 points of centralized on the mean)")
    parser.add_argument("--out", default="results", help="directory for the JSON and PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        federated = [federated_result(Path(p)) for p in args.federated]
        centralized = [centralized_result(Path(p), args.variant) for p in args.centralized]
        pairs = pair(federated, centralized)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = summarize(pairs, args.target)
    print(format_table(pairs, summary))
    command = "python simulations/seed_gaps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nwrote {write_results(pairs, summary, args, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
