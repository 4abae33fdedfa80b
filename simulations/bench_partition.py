"""Set-up cost of partitioning: fed_adapters' partition() against flwr-datasets reading the plain data set.

The server partitions the run's data set, and a Dirichlet split at small alpha may take many partitioner
seeds before every client holds its minimum; each Ray actor then reads the split back from beside the data
set. For each seed of the run this times (a) drawing the split as built (`partition_rows`: the partitioners
read a two-column copy whose label column they get at once), (b) the same seeds drawn by flwr-datasets on
the plain `datasets.Dataset` (whose lazy column it reads row by row) and (c) `partition()` once the split is
stored, as an actor meets it; checks that all give the same shards, and prints the seconds and the ratio (b)/(a).
Writes `<results_dir>/bench_partition/results.json` beside the resolved `config.toml`.

    python simulations/bench_partition.py configs/sst2_dirichlet.toml --seeds 0-7
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import replace

from common import load_or_explain, output_dir, parse_args

from fed_adapters.federated.config import load_run_config
from fed_adapters.federated.partition import draw_partitions, partition, partition_rows
from fed_adapters.federated.task import training_data
from fed_adapters.provenance import environment


def seed_range(text: str) -> list[int]:
    """`0-7` or `0,3,6`."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed range: write FIRST-LAST (0-7) or a list (0,3,6)")
    return seeds


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/sst2_dirichlet.toml", argv,
                      ("--seeds", {"default": "0-7", "type": seed_range, "help": "run seeds, e.g. 0-7 or 0,3,6"}))
    config = load_or_explain(load_run_config, args)
    if config is None:
        return 2
    if config.partition.method == "iid":  # shuffled before splitting: no partitioner reads a column to time
        print(f"error: {args.config} partitions IID; this benchmark times the partitioners that read a column "
              "(dirichlet, inner_dirichlet, pathological, natural)", file=sys.stderr)
        return 2
    out = output_dir(config.run_dir.parent / "bench_partition", config.to_toml())
    importlib.import_module("flwr_datasets.partitioner")  # before timing: the first partitioner would pay it
    rows = []
    for seed in args.seeds:
        run = replace(config, seed=seed)
        data = training_data(run)
        ours, ours_seconds = timed(lambda: partition_rows(data, run.partition, run.data.label, seed))
        (plain, seeds_drawn), plain_seconds = timed(lambda: draw_partitions(data, run.partition, run.data.label, seed))
        partition(data, run.partition, run.data.label, seed)  # stores the split, if not yet stored
        stored, stored_seconds = timed(lambda: partition(data, run.partition, run.data.label, seed))
        texts = [[list(data.select(r)[run.data.text]) for r in ours], [list(s[run.data.text]) for s in plain],
                 [list(s[run.data.text]) for s in stored]]
        rows.append({"seed": seed, "partitioner_seeds": seeds_drawn, "seconds": ours_seconds,
                     "plain_dataset_seconds": plain_seconds, "speedup": plain_seconds / ours_seconds,
                     "stored_seconds": stored_seconds, "same_shards": texts[0] == texts[1] == texts[2]})
    header = (f"{'seed':>4} {'partitioner seeds':>17} {'fed_adapters s':>14} {'plain Dataset s':>15} {'ratio':>7} "
              f"{'stored s':>8} {'same shards':>11}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['seed']:>4} {r['partitioner_seeds']:>17} {r['seconds']:>14.2f} {r['plain_dataset_seconds']:>15.2f} "
              f"{r['speedup']:>6.1f}x {r['stored_seconds']:>8.3f} {str(r['same_shards']):>11}")
    total, plain_total = sum(r["seconds"] for r in rows), sum(r["plain_dataset_seconds"] for r in rows)
    print(f"all seeds: {total:.2f} s against {plain_total:.2f} s ({plain_total / total:.1f}x)")
    payload = {"benchmark": "partition", "config": config.to_dict(), "seeds": rows,
               "seconds": total, "plain_dataset_seconds": plain_total, "environment": environment()}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0 if all(r["same_shards"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
