"""Personalization: what each mode shares and keeps, that it trains and evaluates, and that private state persists."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fed_adapters import cli
from fed_adapters.configuration import ConfigError
from fed_adapters.data import make_loader
from fed_adapters.federated.client_report import format_summary, summarize
from fed_adapters.federated.personalization import (
    PRIVATE,
    SharedWire,
    evaluate_client,
    private_parameters,
    shared_parameters,
    snapshot,
    train_client,
)
from fed_adapters.federated.private_store import PrivateStateError, PrivateStore
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.task import ClientSite, build_adapted_model, client_data, shards, tokenizer
from fed_adapters.training import evaluate, train

MODES = [
    ("none", "head"), ("finetune", "head"), ("split", "head"), ("split", "top_layers"), ("split", "stacked"),
    ("ditto", "head"), ("fusion", "head"),
]


def _config(tmp_path, tiny_base, keyword_data, mode: str, private: str, personalization: dict | None = None, **sections):
    """Four 1-label clients (pathological): what a global model serves worst and a personal one best."""
    return tiny_config(tmp_path, tiny_base, keyword_data,
                       personalization={"mode": mode, "private": private, "finetune_steps": 5, **(personalization or {})},
                       partition={"method": "pathological", "num_clients": 4, "labels_per_client": 1,
                                  "local_test_fraction": 0.25}, **sections)


def _client_functions(model, config, client: int, steps: int = 8):
    """What the ClientApp passes to personalization: seeded local training and local-test evaluation."""
    train_set, test_set = client_data(config, ClientSite(client))
    tok = tokenizer(config.model.name)

    def fit(max_steps=None, prox_mu=0.0, prox_reference=None):
        loader = make_loader(train_set, tok, 16, shuffle=True, seed=client)
        return train(model, loader, max_steps=max_steps or steps, lr=1e-2, device="cpu",
                     prox_mu=prox_mu, prox_reference=prox_reference)

    return fit, lambda: evaluate(model, make_loader(test_set, tok, 64), device="cpu")


@pytest.mark.parametrize("mode,private", MODES, ids=[f"{m}-{p}" for m, p in MODES])
def test_every_mode_shares_only_its_shared_part_trains_and_evaluates(tmp_path, tiny_base, keyword_data, mode, private) -> None:
    config = _config(tmp_path, tiny_base, keyword_data, mode, private)
    model = build_adapted_model(config)
    shared, kept = shared_parameters(model, config), private_parameters(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    assert shared
    assert all(".bottleneck_adapters.default." in names[id(p)] or k.startswith("head.") for k, p in shared.items())
    if mode in ("none", "finetune"):
        assert kept == {}
    elif mode == "split":  # nothing kept private is ever shared
        assert not {id(p) for p in shared.values()} & {id(p) for p in kept.values()}
        assert not any(k.startswith("head.") for k in shared)
    else:  # ditto / fusion: a private adapter beside the shared one; the head's personal values stay home
        assert any(k.startswith(f"{PRIVATE}/") for k in kept) and any(k.startswith("head.") for k in kept)

    store = PrivateStore(config.private_state_dir)
    initial = SharedWire(config).pack(model)
    fit, evaluate_now = _client_functions(model, config, client=0)
    outgoing, stats = train_client(model, config, initial, store, 0, fit)
    assert stats.steps == 8
    assert set(outgoing.keys()) == set(shared)  # the reply carries exactly the shared tensors
    sent, start = outgoing.to_torch_state_dict(), initial.to_torch_state_dict()
    assert any(not torch.equal(sent[k], start[k]) for k in shared), "the shared part did not train"
    assert store.path(0).exists() == (mode not in ("none", "finetune"))

    global_metrics, personal = evaluate_client(model, config, outgoing, store, 0, evaluate_now, fit)
    assert global_metrics["num_examples"] == personal["num_examples"] == len(client_data(config, ClientSite(0))[1])
    if mode == "none":
        assert personal == global_metrics
    else:
        assert personal["loss"] != global_metrics["loss"]


def _one_trained_client(config, client: int):
    """A fresh model after one round of `client`: (model, store, reply arrays, fit, evaluate)."""
    model = build_adapted_model(config)
    store = PrivateStore(config.private_state_dir)
    fit, evaluate_now = _client_functions(model, config, client)
    outgoing, _ = train_client(model, config, SharedWire(config).pack(model), store, client, fit)
    return model, store, outgoing, fit, evaluate_now


def test_ditto_sends_the_global_head_and_keeps_the_personal_one(tmp_path, tiny_base, keyword_data) -> None:
    config = _config(tmp_path, tiny_base, keyword_data, "ditto", "head")
    _, store, outgoing, _, _ = _one_trained_client(config, 1)
    kept, sent = load_file(str(store.path(1))), outgoing.to_torch_state_dict()
    head_keys = [k for k in kept if k.startswith("head.")]
    assert head_keys and all(not torch.equal(kept[k], sent[k]) for k in head_keys)


def test_private_state_survives_a_new_process_model(tmp_path, tiny_base, keyword_data) -> None:
    """A rebuilt model (a restarted client) picks its private tensors up from the store, bit for bit."""
    config = _config(tmp_path, tiny_base, keyword_data, "split", "stacked")
    model, store, outgoing, fit, evaluate_now = _one_trained_client(config, 2)
    _, personal = evaluate_client(model, config, outgoing, store, 2, evaluate_now, fit)
    trained_private = snapshot(private_parameters(model, config))

    fresh = build_adapted_model(config)
    assert any(not torch.equal(v, trained_private[k]) for k, v in snapshot(private_parameters(fresh, config)).items())
    fit2, evaluate2 = _client_functions(fresh, config, client=2)
    _, personal_again = evaluate_client(fresh, config, outgoing, store, 2, evaluate2, fit2)
    assert personal_again == personal
    assert all(torch.equal(v, trained_private[k]) for k, v in snapshot(private_parameters(fresh, config)).items())


def test_personalization_config_errors(tmp_path, tiny_base, keyword_data) -> None:
    with pytest.raises(ConfigError, match="personalization.mode = 'fedper' is not one of none, finetune, split, ditto, fusion"):
        _config(tmp_path, tiny_base, keyword_data, "fedper", "head")
    with pytest.raises(ConfigError, match="keeps the head private, but adapter.train_head = false"):
        _config(tmp_path, tiny_base, keyword_data, "split", "head", adapter={"train_head": False})
    with pytest.raises(ConfigError, match="is judged on each client's local test split"):
        tiny_config(tmp_path, tiny_base, keyword_data, personalization={"mode": "ditto"},
                    partition={"local_test_fraction": 0.0})
    config = _config(tmp_path, tiny_base, keyword_data, "split", "top_layers", personalization={"private_layers": 2})
    with pytest.raises(ConfigError, match="private_layers = 2 would keep every one of the model's 2 layers private"):
        build_adapted_model(config)


def test_a_damaged_private_state_file_is_reported_not_overwritten(tmp_path) -> None:
    store = PrivateStore(tmp_path)
    store.save(3, {"w": torch.ones(2)})
    assert torch.equal(store.load(3)["w"], torch.ones(2)) and store.clients() == [3]
    store.path(3).write_bytes(b"not a safetensors file")
    with pytest.raises(PrivateStateError, match="private state of client 3 .* cannot be read .*delete the file"):
        store.load(3)
    assert store.path(3).read_bytes() == b"not a safetensors file"


def test_client_summary_reports_mean_median_and_worst_tenth() -> None:
    rows = [{"global_accuracy": g / 20, "personal_accuracy": 1 - g / 40} for g in range(20)]
    summary = summarize(rows)
    assert summary["clients"] == 20
    assert summary["global"]["worst_10pct"] == pytest.approx((0 + 0.05) / 2)  # the lowest 2 of 20
    assert summary["global"]["median"] == pytest.approx(0.475)
    assert summary["personal"]["mean"] == pytest.approx(1 - 9.5 / 40)


def test_split_federation_keeps_private_tensors_off_the_wire_and_across_runs(tmp_path, tiny_base, keyword_data) -> None:
    """A real Ray simulation: the messages themselves carry no private tensor, in either direction; the
    per-client report is written; a second run with the same state_dir continues from the stored state."""
    state_dir = tmp_path / "private"
    config = _config(tmp_path, tiny_base, keyword_data, "split", "stacked",
                     personalization={"state_dir": str(state_dir)}, strategy={"num_rounds": 2, "fraction_evaluate": 1.0}, train={"local_epochs": 2, "device": "cpu"})
    recorder = simulate(config, verbose=False)
    model = build_adapted_model(config)
    shared_keys = set(shared_parameters(model, config))
    assert recorder.wire_keys["down"] == recorder.wire_keys["up"] == shared_keys
    assert not any(k.startswith("head.") for k in shared_keys)  # the head stays home too
    assert all(r["client_personal_accuracy"] >= 0 for r in recorder.records[1:])
    metrics = json.loads((config.run_dir / "metrics.json").read_text())
    assert metrics["clients"]["clients"] == 4 and len(recorder.clients) == 4
    assert (config.run_dir / "clients.csv").read_text().count("\n") == 5
    assert (config.run_dir / "personalization.png").stat().st_size > 0
    # Pathological 1-label clients: their own head and stacked adapter beat the shared-only model.
    assert metrics["clients"]["personal"]["mean"] > metrics["clients"]["global"]["mean"]

    # export -> predict reproduces the in-simulation personal model: same accuracy on the client's local test.
    client = 1
    test_rows = shards(config)[client].test
    (tmp_path / "client.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                   for t, y in zip(test_rows["text"], test_rows["label"])))
    assert cli.main(["export", str(config.run_dir), "--client", str(client), str(tmp_path / "export")]) == 0
    assert cli.main(["predict", str(tmp_path / "export"), "--input", str(tmp_path / "client.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), "--max-length", "16"]) == 0
    predicted = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    accuracy = sum(r["prediction"] == r["label"] for r in predicted) / len(predicted)
    assert accuracy == pytest.approx(recorder.clients[client]["personal_accuracy"])
    assert cli.main(["export", str(config.run_dir), "--client", "9", str(tmp_path / "nope")]) == 2
    # An existing export is never replaced unasked, and the run's own final adapter never.
    exported = (tmp_path / "export" / "adapter.safetensors").read_bytes()
    assert cli.main(["export", str(config.run_dir), "--client", "0", str(tmp_path / "export")]) == 2
    assert (tmp_path / "export" / "adapter.safetensors").read_bytes() == exported
    assert cli.main(["export", str(config.run_dir), "--client", "0", str(tmp_path / "export"), "--overwrite"]) == 0
    assert (tmp_path / "export" / "adapter.safetensors").read_bytes() != exported
    final = (config.run_dir / "adapter" / "adapter.safetensors").read_bytes()
    assert cli.main(["export", str(config.run_dir), "--client", "0", str(config.run_dir / "adapter"), "--overwrite"]) == 2
    assert (config.run_dir / "adapter" / "adapter.safetensors").read_bytes() == final

    stored = {c: load_file(str(PrivateStore(state_dir).path(c))) for c in range(4)}
    again = _config(tmp_path, tiny_base, keyword_data, "split", "stacked", run_name="again",
                    personalization={"state_dir": str(state_dir)}, strategy={"num_rounds": 1, "fraction_evaluate": 0.0}, train={"local_steps": 1, "lr": 1e-9, "device": "cpu"})
    simulate(again, verbose=False)
    initial = model.initial_private_state
    for client, before in stored.items():
        after = load_file(str(PrivateStore(state_dir).path(client)))
        assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)  # continued from the store...
        assert any(not torch.allclose(after[k], initial[k]) for k in before)  # ...not from a fresh start


def test_report_marks_clients_sampled_in_no_round(tmp_path, tiny_base, keyword_data) -> None:
    """With half the clients per round, some never train their private part: the report says which and how many."""
    config = _config(tmp_path, tiny_base, keyword_data, "split", "head",
                     strategy={"num_rounds": 1, "fraction_train": 0.5, "min_train_clients": 2, "sampling": "shuffled"})
    simulate(config, verbose=False)
    stored = set(PrivateStore(config.private_state_dir).clients())
    assert len(stored) == 2
    rows = list(csv.DictReader((config.run_dir / "clients.csv").open()))
    assert {int(r["client"]) for r in rows if r["personal_trained"] == "True"} == stored
    assert {int(r["client"]) for r in rows if r["personal_trained"] == "False"} == {0, 1, 2, 3} - stored
    metrics = json.loads((config.run_dir / "metrics.json").read_text())
    assert metrics["clients"]["never_trained"] == 2
    assert "2 client(s) were sampled in no round" in format_summary(metrics["clients"])
