"""Head calibration: exact merging of class feature statistics, the LDA head, and the round trip in a real
Ray simulation (the saved head is the LDA fit on every client's features under the final adapter)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fed_adapters.adapters import load_adapter
from fed_adapters.configuration import ConfigError
from fed_adapters.data import make_loader
from fed_adapters.federated.head_calibration import (
    STATISTICS, CalibrationError, feature_statistics, lda_head, merge_statistics,
)
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated import task
from fed_adapters.federated.task import ClientSite, build_adapted_model, client_data, shards, tokenized, tokenizer
from fed_adapters.training import evaluate

CALIBRATE = dict(head_calibration={"method": "lda", "shrinkage": 0.2, "fraction": 0.5},
                 strategy={"num_rounds": 2, "fraction_train": 1.0})


def _statistics(x: np.ndarray, y: np.ndarray, num_labels: int) -> dict[str, np.ndarray]:
    counts = np.bincount(y, minlength=num_labels).astype(float)
    means = np.stack([x[y == c].mean(0) if counts[c] else np.zeros(x.shape[1]) for c in range(num_labels)])
    centred = x - means[y]
    return dict(zip(STATISTICS, (counts, means, centred.T @ centred)))


def _hand_fitted_head(model: torch.nn.Module, config, clients: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The LDA head (shrinkage 0.2) on `clients`' training splits under `model`, computed here, not by the server."""
    parts = [feature_statistics(model, make_loader(client_data(config, ClientSite(c))[0], tokenizer(config.model.name), 64),
                                2, "cpu") for c in clients]
    return lda_head(*merge_statistics(parts), shrinkage=0.2)


def _held_out_metrics(model: torch.nn.Module, config) -> dict:
    """`model` on the run's held-out split, as the server evaluates it."""
    test_loader = make_loader(tokenized(config, task.test_data(config), (-1, "test")), tokenizer(config.model.name), 64)
    return evaluate(model, test_loader, device="cpu")


def test_merged_statistics_equal_those_of_all_examples_together() -> None:
    """Parts with different label mixes (one holds a single label) merge to the pooled statistics exactly."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 4, 20, axis=0)
    y = np.repeat(np.arange(3), 20)
    cuts = [slice(0, 7), slice(7, 20), slice(20, 45), slice(45, 60)]  # part 0 holds label 0 only
    counts, means, covariance = merge_statistics([_statistics(x[c], y[c], 3) for c in cuts])
    whole = _statistics(x, y, 3)
    np.testing.assert_allclose(counts, [20, 20, 20])
    np.testing.assert_allclose(means, whole["class-means"], atol=1e-12)
    np.testing.assert_allclose(covariance, whole["within-scatter"] / 60, atol=1e-12)


def test_lda_head_matches_the_textbook_formula_and_refuses_a_missing_label() -> None:
    rng = np.random.default_rng(1)
    counts = np.array([30.0, 10.0])
    means = rng.normal(size=(2, 4))
    a = rng.normal(size=(4, 4))
    covariance = a @ a.T + np.eye(4)
    weight, bias = lda_head(counts, means, covariance, shrinkage=0.25)
    shrunk = 0.75 * covariance + 0.25 * np.trace(covariance) / 4 * np.eye(4)
    inverse = np.linalg.inv(shrunk)
    for c in range(2):
        np.testing.assert_allclose(weight[c], inverse @ means[c], atol=1e-10)
        np.testing.assert_allclose(bias[c], -0.5 * means[c] @ inverse @ means[c] + np.log(counts[c] / 40), atol=1e-10)
    with pytest.raises(CalibrationError, match=r"label\(s\) \[1\].*head_calibration.fraction"):
        lda_head(np.array([5.0, 0.0]), means, covariance, 0.1)
    with pytest.raises(CalibrationError, match="covariance is singular at shrinkage 0.0; raise head_calibration.shrinkage"):
        lda_head(counts, means, np.zeros((4, 4)), 0.0)  # e.g. every client's features identical


def test_calibrated_federation_saves_the_lda_head_of_the_sampled_clients_features(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, **CALIBRATE)
    records = simulate(config, verbose=False).records
    # Rounds count the examples trained on apart from the shards' sizes: 3 local epochs each.
    assert all(r["train_examples_seen"] == 3 * r["train_examples"] > 0 for r in records[1:])
    metrics = json.loads((config.run_dir / "metrics.json").read_text())
    calibration = metrics["head_calibration"]
    # Half of the 4 clients were asked and answered; only the three statistics came back, in float64.
    hidden, labels = 32, 2
    asked = calibration["clients"]
    assert calibration["clients_sampled"] == calibration["clients_replied"] == len(asked) == 2
    assert calibration["tensors_up"] == sorted(STATISTICS)
    assert calibration["tensor_bytes_up"] == 2 * (labels + labels * hidden + hidden * hidden) * 8
    assert calibration["examples"] == sum(len(shards(config)[c].train) for c in asked) == sum(calibration["class_counts"])

    # Recompute by hand: the final round's adapter (checkpoint) on those clients' training splits, merged, LDA.
    model = build_adapted_model(config)
    load_adapter(model, config.run_dir / "checkpoints" / f"round-{config.strategy.num_rounds:03d}")
    weight, bias = _hand_fitted_head(model, config, asked)
    saved = build_adapted_model(config)
    load_adapter(saved, config.run_dir / "adapter")
    torch.testing.assert_close(saved.classifier.weight, torch.from_numpy(weight).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(saved.classifier.bias, torch.from_numpy(bias).float(), atol=1e-4, rtol=1e-4)
    # The body is the final round's; the recorded metrics are the calibrated model's on the held-out split.
    for name, value in model.state_dict().items():
        if "classifier" not in name:
            torch.testing.assert_close(saved.state_dict()[name], value)
    after = _held_out_metrics(saved, config)
    assert calibration["accuracy"] == pytest.approx(after["accuracy"]) and calibration["loss"] == pytest.approx(after["loss"])
    assert calibration["loss"] != pytest.approx(records[-1]["loss"])  # the head did change


def test_initial_head_is_the_lda_probe_of_the_initial_adapter_and_round_zero_evaluates_it(
        tmp_path, tiny_base, keyword_data) -> None:
    """LP-FT: before round 1 the head is fitted on every client's features under the initial adapter; the clients
    train from it (round 1 differs from a run without it) and the round-0 record is that probe's accuracy."""
    sections = dict(head_calibration={"method": "lda", "shrinkage": 0.2, "initial": True},
                    strategy={"num_rounds": 1, "fraction_train": 1.0})
    config = tiny_config(tmp_path, tiny_base, keyword_data, **sections)
    records = simulate(config, verbose=False).records
    initial = json.loads((config.run_dir / "metrics.json").read_text())["initial_head_calibration"]
    every = list(range(len(shards(config))))
    assert initial["clients"] == every and initial["examples"] == sum(len(shards(config)[c].train) for c in every)

    model = build_adapted_model(config)  # the initial adapter, as seeded
    weight, bias = _hand_fitted_head(model, config, every)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weight))
        model.classifier.bias.copy_(torch.from_numpy(bias))
    probe = _held_out_metrics(model, config)
    assert records[0]["loss"] == pytest.approx(probe["loss"], rel=1e-5)
    assert records[0]["accuracy"] == pytest.approx(probe["accuracy"])

    seeded = tiny_config(tmp_path, tiny_base, keyword_data, run_name="seeded_head",
                         head_calibration={"method": "lda", "shrinkage": 0.2}, strategy=sections["strategy"])
    plain = simulate(seeded, verbose=False).records
    assert plain[0]["loss"] != pytest.approx(records[0]["loss"]) and plain[1]["loss"] != pytest.approx(records[1]["loss"])
    assert "initial_head_calibration" not in json.loads((seeded.run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("sections, message", [
    (dict(head_calibration={"method": "svm"}), "head_calibration.method = 'svm' is not one of none, lda"),
    (dict(head_calibration={"fraction": 0.0}), r"head_calibration.fraction must lie in \(0, 1\]"),
    (dict(head_calibration={"method": "lda"}, model={"task": "causal_lm"}), "pooled-feature classifier"),
    (dict(head_calibration={"method": "lda"}, adapter={"train_head": False}), "adapter.train_head = true"),
    (dict(head_calibration={"method": "lda"}, privacy={"dp": "central"}), "in the clear"),
    (dict(head_calibration={"initial": True}), "head_calibration.initial = true .* set head_calibration.method = 'lda'"),
])
def test_head_calibration_config_errors(tmp_path, tiny_base, keyword_data, sections, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, tiny_base, keyword_data, **sections)
