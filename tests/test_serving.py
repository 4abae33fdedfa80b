"""Serving many clients' adapters on one base: a mixed batch equals each client's own model."""

from __future__ import annotations

import json

import pytest
import torch

from fed_adapters.adapters import AdapterConfig, AdapterStateError, Stack, add_adapter, load_adapter, save_adapter
from fed_adapters.adapters import save_adapter_set, set_active_adapter
from fed_adapters.modeling import load_model, load_tokenizer
from fed_adapters.serving import AdapterServer

TEXTS = ["a film of quiet power", "dull and lifeless", "the camera work is excellent", "a slow city night",
         "green table water", "excellent music, weak plot", "open road", "late early slow"]


def _client_adapters(tmp_path, tiny_base, count: int) -> list:
    directories = []
    for client in range(count):
        torch.manual_seed(100 + client)
        model = load_model(str(tiny_base), num_labels=3)
        add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=4, init="bert", scaling=10.0))
        with torch.no_grad():
            model.classifier.weight.normal_()
            model.classifier.bias.normal_()
        directories.append(save_adapter(model, tmp_path / f"client-{client}"))
    return directories


def test_mixed_batch_equals_each_clients_own_model(tmp_path, tiny_base) -> None:
    directories = _client_adapters(tmp_path, tiny_base, 4)
    tokenizer = load_tokenizer(str(tiny_base))
    server = AdapterServer(load_model(str(tiny_base), num_labels=3), tokenizer)
    for client, directory in enumerate(directories):
        server.add_client(str(client), directory)
    clients = ["0", "3", "1", "1", "2", "0", "3", "2"]
    mixed = server.predict(TEXTS, clients)
    assert torch.allclose(mixed, server.predict_one_client_at_a_time(TEXTS, clients), atol=1e-5)
    for i, (text, client) in enumerate(zip(TEXTS, clients)):  # against a fresh model holding only that client's adapter
        own = load_model(str(tiny_base), num_labels=3)
        load_adapter(own, directories[int(client)])
        with torch.no_grad():
            expected = own(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0]
        assert torch.allclose(mixed[i], expected, atol=1e-5)
    assert len({tuple(row.round(decimals=4).tolist()) for row in mixed[[0, 1, 2, 4]]}) == 4  # clients really differ


def test_serving_errors(tmp_path, tiny_base) -> None:
    directories = _client_adapters(tmp_path, tiny_base, 1)
    server = AdapterServer(load_model(str(tiny_base), num_labels=3), load_tokenizer(str(tiny_base)))
    server.add_client("a", directories[0])
    with pytest.raises(KeyError, match=r"client\(s\) \['b'\] not loaded"):
        server.predict(["x"], ["b"])
    with pytest.raises(ValueError, match="2 texts but 1 client ids"):
        server.predict(["x", "y"], ["a"])
    two_labels = AdapterServer(load_model(str(tiny_base), num_labels=2), load_tokenizer(str(tiny_base)))
    with pytest.raises(AdapterStateError, match="made for another base or label count"):
        two_labels.add_client("a", directories[0])
    stacked = load_model(str(tiny_base), num_labels=3)
    add_adapter(stacked, AdapterConfig(bottleneck_size=4), "shared")
    add_adapter(stacked, AdapterConfig(bottleneck_size=4), "private")
    set_active_adapter(stacked, Stack("shared", "private"))
    save_adapter_set(stacked, tmp_path / "stacked")
    with pytest.raises(AdapterStateError, match="holds a stack of adapters .* only single adapters batch"):
        server.add_client("s", tmp_path / "stacked")


def test_predict_cli_writes_what_the_model_predicts(tmp_path, tiny_base) -> None:
    from fed_adapters import cli

    directory = _client_adapters(tmp_path, tiny_base, 1)[0]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": {i}, "text": "{t}"}}\n' for i, t in enumerate(TEXTS)))
    assert cli.main(["predict", str(directory), "--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = load_model(str(tiny_base), num_labels=3)
    load_adapter(model, directory)
    with torch.no_grad():
        expected = model(**load_tokenizer(str(tiny_base))(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert [r["id"] for r in rows] == list(range(len(TEXTS)))
    assert [r["prediction"] for r in rows] == expected.argmax(-1).tolist()
    assert torch.allclose(torch.tensor([r["probabilities"] for r in rows]), expected, atol=1e-5)

    # Bad input: one clear line, exit 2, nothing overwritten.
    before = (tmp_path / "out.jsonl").read_text()
    assert cli.main(["predict", str(directory), "--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert (tmp_path / "out.jsonl").read_text() == before
    source.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(Exception, match="in.jsonl:2 is not valid JSON"):
        cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o2.jsonl")])
    source.write_text('{"sentence": "fine"}\n')
    with pytest.raises(Exception, match=r"in.jsonl:1 lacks column\(s\) \['text'\]; name the text column"):
        cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o3.jsonl")])
