"""simulations/seed_gaps.py: federated runs paired with centralized runs by seed, and what it refuses to pair."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from fed_adapters.configuration import to_toml
from fed_adapters.federated.simulation import simulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "simulations"))
import centralized  # noqa: E402
import seed_gaps  # noqa: E402

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base, keyword_data) -> tuple[list[Path], list[Path], Path]:
    """Two seeds of a tiny federation (real Ray simulations, head calibrated) and of the matching centralized run."""
    root = tmp_path_factory.mktemp("seed-gaps")
    federated = []
    for seed in SEEDS:
        config = tiny_config(root, tiny_base, keyword_data, run_name=f"fed_s{seed}", seed=seed,
                             strategy={"num_rounds": 1, "fraction_evaluate": 0.0}, partition={"local_test_fraction": 0.0},
                             train={"local_steps": 4, "batch_size": 16, "lr": 1e-2, "device": "cpu"},
                             head_calibration={"method": "lda"})
        simulate(config, verbose=False)
        federated.append(config.run_dir)
    central_toml = root / "centralized.toml"
    central_toml.write_text(to_toml({
        "model": str(tiny_base), "results_dir": str(root / "centralized"),
        "data": {"source": str(keyword_data), "max_length": 16},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2},
        "variants": [{"name": "houlsby-m8", "method": "adapter", "adapter": {"preset": "houlsby", "bottleneck_size": 8}}],
    }))
    for seed in SEEDS:
        assert centralized.main([str(central_toml), "--set", f"seed={seed}", "--set", f"run_name=cen_s{seed}"]) == 0
    return federated, [root / "centralized" / f"cen_s{seed}" for seed in SEEDS], root


def gaps(*args: str, federated: list[Path], centralized_runs: list[Path], out: Path) -> int:
    return seed_gaps.main(["--federated", *map(str, federated), "--centralized", *map(str, centralized_runs),
                           "--variant", "houlsby-m8", "--out", str(out), "--name", "gaps", *args])


def test_seed_gaps_pairs_each_federated_run_with_the_centralized_run_of_its_seed(runs, tmp_path) -> None:
    federated, central, _ = runs
    # Given in another order than the seeds': pairing goes by each run's own seed.
    assert gaps("--target", "3", federated=federated[::-1], centralized_runs=central, out=tmp_path) == 0
    result = json.loads((tmp_path / "gaps.json").read_text())
    assert (tmp_path / "gaps.png").stat().st_size > 0
    expected = []
    for seed, run in zip(SEEDS, result["runs"]):
        metrics = json.loads((federated[seed] / "metrics.json").read_text())
        fed = 100 * metrics["head_calibration"]["accuracy"]  # the final adapter's: after calibration
        assert run["federated"]["last_round"]["accuracy"] == round(100 * metrics["rounds"][-1]["accuracy"], 2)
        cen = 100 * json.loads((central[seed] / "results.json").read_text())["results"][0]["accuracy"]
        assert run["seed"] == seed and run["federated"]["run"] == str(federated[seed])
        assert run["federated"]["accuracy"] == round(fed, 2) and run["centralized"]["accuracy"] == round(cen, 2)
        assert run["gap"] == round(fed - cen, 2)
        expected.append(fed - cen)
    summary = result["summary"]
    assert summary["seeds"] == list(SEEDS)
    assert summary["mean_gap"] == round(statistics.fmean(expected), 2)
    assert summary["gap_standard_error"] == round(statistics.stdev(expected) / 2 ** 0.5, 2)
    assert summary["target_met"] == (summary["mean_gap"] >= -3)
    assert result["federated_settings"]["train.local_steps"] == 4 and "seed" not in result["federated_settings"]
    assert result["command"].startswith("python simulations/seed_gaps.py --federated")


def edited_copy(run: Path, destination: Path, file: str, old: str, new: str) -> Path:
    copy = shutil.copytree(run, destination)
    text = (copy / file).read_text()
    assert old in text
    (copy / file).write_text(text.replace(old, new, 1))
    return copy


def test_seed_gaps_refuses_runs_it_cannot_pair(runs, tmp_path, capsys) -> None:
    federated, central, root = runs
    other_lr = edited_copy(federated[1], tmp_path / "lr", "config.toml", "lr = 0.01", "lr = 0.02")
    resized = [edited_copy(run, tmp_path / f"size{i}", "results.json", '"train_size": null', '"train_size": 100')
               for i, run in enumerate(central)]
    held_back = [edited_copy(run, tmp_path / f"local{i}", "config.toml", "local_test_fraction = 0.0",
                             "local_test_fraction = 0.2") for i, run in enumerate(federated)]
    truncated = [edited_copy(run, tmp_path / f"len{i}", "results.json", '"max_length": 16', '"max_length": 32')
                 for i, run in enumerate(central)]
    refused = {
        "seed 1 has a federated run but no centralized one": dict(centralized_runs=central[:1]),
        "federated runs differ in train.lr (0.01 in": dict(federated=[federated[0], other_lr]),
        "federated runs repeat seed 0": dict(federated=[federated[0], federated[0]]),
        "centralized runs differ in data.train_size": dict(centralized_runs=[central[0], resized[1]]),
        "but the centralized ones data.train_size = 100: a gap needs both trained and judged on the same data":
            dict(centralized_runs=resized),
        f"{root} is not a finished federated run": dict(federated=[root]),
        "hold back partition.local_test_fraction = 0.2 of each client's examples": dict(federated=held_back),
        "federated runs have model.max_length = 16 but the centralized ones data.max_length = 32":
            dict(centralized_runs=truncated),
    }
    for message, inputs in refused.items():
        arguments = {"federated": federated, "centralized_runs": central, "out": tmp_path / "out", **inputs}
        assert gaps(**arguments) == 2, message
        assert message in capsys.readouterr().err
    assert seed_gaps.main(["--federated", str(federated[0]), "--centralized", str(central[0]), "--variant", "m64",
                           "--out", str(tmp_path / "out")]) == 2
    assert "has no variant 'm64' (it has houlsby-m8); choose one with --variant" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a refused comparison
