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
    for method in (server.predict, server.predict_one_client_at_a_time):
        with pytest.raises(ValueError, match="no texts to predict"):
            method([], [])
    empty = AdapterServer(load_model(str(tiny_base), num_labels=3), load_tokenizer(str(tiny_base)))
    with pytest.raises(KeyError, match=r"not loaded; loaded: none \(add_client first\)"):
        empty.predict(["x"], ["a"])
    two_labels = AdapterServer(load_model(str(tiny_base), num_labels=2), load_tokenizer(str(tiny_base)))
    with pytest.raises(AdapterStateError, match="made for another base, label count or pooling .*num_labels 3"):
        two_labels.add_client("a", directories[0])
    cls_model = load_model(str(tiny_base), num_labels=3, pooling="cls")
    add_adapter(cls_model, AdapterConfig(bottleneck_size=4))
    save_adapter(cls_model, tmp_path / "cls")  # its head reads the first token, the server's the mean
    with pytest.raises(AdapterStateError, match="pooling 'cls' \\(the head reads that\\) vs 'mean' \\(model\\)"):
        server.add_client("c", tmp_path / "cls")
    stacked = load_model(str(tiny_base), num_labels=3)
    add_adapter(stacked, AdapterConfig(bottleneck_size=4), "shared")
    add_adapter(stacked, AdapterConfig(bottleneck_size=4), "private")
    set_active_adapter(stacked, Stack("shared", "private"))
    save_adapter_set(stacked, tmp_path / "stacked")
    with pytest.raises(AdapterStateError, match="holds a stack of adapters .* only single adapters batch"):
        server.add_client("s", tmp_path / "stacked")


def test_a_failed_add_client_leaves_the_server_as_it_was(tmp_path, tiny_base) -> None:
    good = _client_adapters(tmp_path, tiny_base, 1)[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter.safetensors", "adapter_config.json"):
        (bad / name).write_bytes((good / name).read_bytes())
    metadata = json.loads((bad / "adapter_config.json").read_text())
    metadata["adapter_config"]["bottleneck_size"] = 8  # the tensors hold 4
    (bad / "adapter_config.json").write_text(json.dumps(metadata))
    server = AdapterServer(load_model(str(tiny_base), num_labels=3), load_tokenizer(str(tiny_base)))
    adapters_before = set(server.model.adapter_configs) if hasattr(server.model, "adapter_configs") else set()
    with pytest.raises(AdapterStateError, match="has shape"):
        server.add_client("a", bad)
    assert set(getattr(server.model, "adapter_configs", {})) == adapters_before and server.clients == {}
    server.add_client("a", good)  # the same client id, now from a good file
    assert server.predict(TEXTS[:2], ["a", "a"]).shape == (2, 3)


def test_an_adapter_trained_on_a_frozen_head_keeps_that_head(tmp_path, tiny_base) -> None:
    """train_head=False: the head did not train, but the adapter learned against it, so it is saved with it."""
    torch.manual_seed(7)
    model = load_model(str(tiny_base), num_labels=3)
    add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=10.0, train_head=False))
    assert not model.classifier.weight.requires_grad
    tokenizer = load_tokenizer(str(tiny_base))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.softmax(-1)
    save_adapter(model, tmp_path / "frozen-head")
    torch.manual_seed(8)  # another seed: another random head, unless the file's is loaded
    server = AdapterServer(load_model(str(tiny_base), num_labels=3), tokenizer)
    server.add_client("a", tmp_path / "frozen-head")
    assert torch.allclose(server.predict(TEXTS, ["a"] * len(TEXTS)), expected, atol=1e-5)
    # A file without its head (as saved before heads were always kept) is refused, not served with a random one.
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    headless.mkdir()
    tensors = load_file(str(tmp_path / "frozen-head" / "adapter.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("head.")}, str(headless / "adapter.safetensors"))
    metadata = json.loads((tmp_path / "frozen-head" / "adapter_config.json").read_text())
    del metadata["save_id"]  # such files predate save ids
    (headless / "adapter_config.json").write_text(json.dumps({**metadata, "includes_head": False}))
    with pytest.raises(AdapterStateError, match="holds no classification head"):
        server.add_client("b", headless)
    from fed_adapters.predict import predict_file
    from fed_adapters.data import DataError

    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n')
    with pytest.raises(DataError, match="holds no classification head"):
        predict_file(headless, source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_predict_cli_writes_what_the_model_predicts(tmp_path, tiny_base, capsys) -> None:
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
    # JSON may hold U+2028 / U+2029 / U+0085 raw inside a string: still one line each.
    source.write_text('{"text": "one\u2028review"}\n{"text": "caf\u00e9 \u0085 ok"}\n', encoding="utf-8")
    assert cli.main(["predict", str(directory), "--input", str(source), "--output", str(tmp_path / "raw.jsonl")]) == 0
    assert len((tmp_path / "raw.jsonl").read_text(encoding="utf-8").split("\n")) == 3  # two rows and the final newline
    source.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(Exception, match="in.jsonl:2 is not valid JSON"):
        cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o2.jsonl")])
    source.write_text('{"sentence": "fine"}\n')
    with pytest.raises(Exception, match=r"in.jsonl:1 lacks column\(s\) \['text'\]; name the text column"):
        cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o3.jsonl")])
    source.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(Exception, match=r"in.jsonl:2: column\(s\) \['text'\] must hold text, got NoneType"):
        cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o4.jsonl")])
    source.write_text('{"text": "fine"}\n')
    for device, message in (("warp-drive", "unknown device 'warp-drive'"), ("cuda:7", "device 'cuda:7' asked for")):
        assert cli.main(["predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o6.jsonl"),
                         "--device", device]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "o6.jsonl").exists()
    for option, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--max-length", "0")):
        with pytest.raises(Exception, match=f"{option} must be a whole number >= 1, got {value}"):
            cli.main(["--debug", "predict", str(directory), "--input", str(source), "--output", str(tmp_path / "o5.jsonl"),
                      option, value])
        assert not (tmp_path / "o5.jsonl").exists()
