"""Integration: the packaged pretrained MiniLM and the real SST-2 data in ../shared/data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from fed_adapters.adapters import AdapterConfig, add_adapter, load_adapter, save_adapter, trainable_parameters
from fed_adapters.data import load_split, make_loader, tokenize_dataset
from fed_adapters.modeling import load_model, load_tokenizer
from fed_adapters.training import evaluate, seed_everything, train

pytestmark = pytest.mark.integration
LINEAR_PROBE_FLOOR = 0.812  # ../shared/data/README.md: frozen MiniLM, mean pooling + logistic regression


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_packaged_minilm_loads_offline_and_adapts() -> None:
    model = load_model()
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=16))
    counts = trainable_parameters(model)
    per_adapter = 2 * 384 * 16 + 384 + 16
    assert counts.trainable == 6 * 2 * per_adapter + 384 * 2 + 2
    assert 0.5 < counts.percent < 1.0


def test_adapter_beats_the_frozen_linear_probe_on_sst2(tmp_path, tokenizer) -> None:
    """A few hundred steps of a Houlsby adapter on real SST-2 beat the frozen-encoder floor on the full dev set."""
    seed_everything(0)
    train_raw = load_split("sst2", "train", SHARED_DATA).shuffle(seed=0).select(range(4800))
    dev_raw = load_split("sst2", "validation", SHARED_DATA)
    train_set = tokenize_dataset(train_raw, tokenizer, num_labels=2)
    dev_set = tokenize_dataset(dev_raw, tokenizer, num_labels=2)
    model = load_model(num_labels=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=16))
    train(model, make_loader(train_set, tokenizer, 16, shuffle=True), max_steps=300, lr=3e-3, device="cpu")
    dev_loader = make_loader(dev_set, tokenizer, 128)
    metrics = evaluate(model, dev_loader, device="cpu")
    assert metrics["num_examples"] == 872
    assert metrics["accuracy"] > LINEAR_PROBE_FLOOR + 0.005, metrics
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items() if n.startswith("encoder."))  # base untouched

    # The trained adapter reloads onto a fresh pretrained base with bit-identical predictions.
    save_adapter(model, tmp_path / "sst2-adapter")
    files = {p.name: p.stat().st_size for p in (tmp_path / "sst2-adapter").iterdir()}
    assert files["adapter.safetensors"] < 0.02 * 4 * 22.7e6  # adapter + head: well under 2 % of the fp32 base
    fresh = load_model(num_labels=2)
    load_adapter(fresh, tmp_path / "sst2-adapter")
    batch = next(iter(dev_loader))
    with torch.no_grad():
        model.eval(), fresh.eval()
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_centralized_benchmark_script_writes_results(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))
    import centralized

    config = Path(__file__).resolve().parents[1] / "configs" / "centralized" / "sst2.toml"
    code = centralized.main([
        str(config), "--only", "pfeiffer-m16,head-only",
        "--set", f"data.data_root={SHARED_DATA}", "--set", "data.train_size=64", "--set", "data.eval_size=32",
        "--set", "train.epochs=1", "--set", f"results_dir={tmp_path}",
    ])
    assert code == 0
    results = json.loads((tmp_path / "sst2" / "results.json").read_text())
    assert [r["variant"] for r in results["results"]] == ["pfeiffer-m16", "head-only"]
    pfeiffer, head = results["results"]
    assert pfeiffer["train_examples"] == 64 and pfeiffer["eval_examples"] == 32
    assert pfeiffer["trainable_params"] == 6 * (2 * 384 * 16 + 384 + 16) + 384 * 2 + 2
    assert head["trainable_params"] == 384 * 2 + 2
    resolved = (tmp_path / "sst2" / "config.toml").read_text()
    assert "train_size = 64" in resolved and 'name = "houlsby-m16"' in resolved
    assert centralized.main([str(config), "--only", "nope"]) == 2
    # A variant's own lr is its rate for all it trains, a head-only variant's head included (not train.head_lr).
    head_only = centralized.Variant(name="head", method="head", lr=1e-2)
    assert centralized.variant_rates(head_only) == {"lr": 1e-2, "head_lr": None}
    assert centralized.variant_rates(centralized.Variant(name="default")) == {}


def test_simulate_cli_runs_minilm_on_an_sst2_slice(tmp_path) -> None:
    """`fed-adapters simulate` end to end: MiniLM, 2 IID clients, 2 rounds, real SST-2 sentences."""
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "fed_adapters.cli", "simulate", str(repo / "configs" / "quickstart.toml"),
        "--set", f"data.data_root={SHARED_DATA}", "--set", f"results_dir={tmp_path}", "--set", "run_name=slice",
        "--set", "data.train_size=160", "--set", "data.test_size=64", "--set", "partition.num_clients=2",
        "--set", "strategy.num_rounds=2", "--set", "train.local_steps=4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "slice"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "accuracy.png", "adapter", "checkpoints", "clients.csv", "config.toml", "metrics.csv", "metrics.json",
        "partition.json", "personalization.png",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["run"]["num_clients"] == 2 and metrics["run"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    per_client = 12 * (2 * 384 * 16 + 384 + 16) + 384 * 2 + 2  # Houlsby m=16 on 6 layers, plus the head
    assert all(r["tensor_bytes_up"] == 2 * 4 * per_client for r in metrics["rounds"][1:])
    sent = metrics["run"]["tensors_up"]  # no base weight left a client: adapter tensors and the head only
    assert len(sent) == 12 * 4 + 2 and all(n.startswith("head.") or n.split(".")[-2] in ("down", "up") for n in sent)
    partition = json.loads((run_dir / "partition.json").read_text())
    assert [c["train_examples"] + c["test_examples"] for c in partition["clients"]] == [80, 80]
    assert "round" in done.stdout and "acc" in done.stdout  # progress lines and the summary table
    model = load_model(num_labels=2)
    assert load_adapter(model, run_dir / "adapter") == "default"
