"""Adapter state: state dicts, the NumPy wire format and files, with their errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model, logits
from safetensors.torch import load_file

from fed_adapters.adapters import (
    AdapterConfig,
    AdapterStateError,
    adapter_state_dict,
    adapter_state_keys,
    add_adapter,
    from_ndarrays,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
    to_ndarrays,
)

CONFIG = AdapterConfig.preset("houlsby", bottleneck_size=8, init="bert", scaling=5.0)


def _adapted(family: str = "bert", seed: int = 0):
    """(pristine base copy, the same base with a randomised adapter and head)."""
    model = tiny_model(family, seed=seed)
    base = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    add_adapter(model, CONFIG)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return base, model


def test_state_dict_holds_adapter_and_head_in_documented_order() -> None:
    _, model = _adapted()
    keys = adapter_state_keys(model)
    assert keys[:4] == [
        "bert.encoder.layer.0.attention.output.dense.down.weight",
        "bert.encoder.layer.0.attention.output.dense.down.bias",
        "bert.encoder.layer.0.attention.output.dense.up.weight",
        "bert.encoder.layer.0.attention.output.dense.up.bias",
    ]
    assert keys[4].startswith("bert.encoder.layer.0.output.dense.")
    assert keys[-2:] == ["head.classifier.weight", "head.classifier.bias"]
    assert len(keys) == 2 * 2 * 4 + 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == trainable
    assert len(adapter_state_keys(model, include_head=False)) == 16


def test_ndarray_round_trip_is_exact(family: str) -> None:
    base, model = _adapted(family)
    arrays = to_ndarrays(model)
    assert all(isinstance(a, np.ndarray) for a in arrays)
    arrays[0][...] = 123.0  # the arrays are copies: mutating one must not touch the model
    assert not torch.any(adapter_state_dict(model)[adapter_state_keys(model)[0]] == 123.0)
    arrays = to_ndarrays(model)
    add_adapter(base, CONFIG)
    from_ndarrays(base, arrays)
    for a, b in zip(to_ndarrays(base), arrays):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    batch = tiny_batch()
    assert torch.equal(logits(base, batch), logits(model, batch))


def test_save_and_load_on_a_fresh_base_is_bit_identical(tmp_path, family: str) -> None:
    base, model = _adapted(family)
    directory = save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    metadata = json.loads((directory / "adapter_config.json").read_text())
    assert metadata["adapter_config"] == CONFIG.to_dict()
    assert metadata["base_model"]["model_type"] == model.config.model_type
    assert metadata["base_model"]["hidden_size"] == 32 and metadata["base_model"]["num_layers"] == 2
    assert metadata["fed_adapters_version"]
    stored = load_file(str(directory / "adapter.safetensors"))
    assert list(stored) and set(stored) == set(adapter_state_keys(model))  # never the base
    name = load_adapter(base, directory)
    assert name == "default" and base.active_adapter == "default"
    batch = tiny_batch()
    assert torch.equal(logits(base, batch), logits(model, batch))


def test_adapter_file_is_small_compared_with_the_base(tmp_path) -> None:
    _, model = _adapted()
    save_adapter(model, tmp_path / "a")
    stored = sum(t.numel() for t in load_file(str(tmp_path / "a" / "adapter.safetensors")).values())
    assert stored == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "dtype"])
def test_state_dict_mismatch_is_refused_and_changes_nothing(fault: str) -> None:
    _, model = _adapted()
    before = adapter_state_dict(model)
    state = {k: torch.zeros_like(v) for k, v in before.items()}
    first = next(iter(state))
    if fault == "missing":
        del state[first]
        message = "missing keys"
    elif fault == "extra":
        state["bert.encoder.layer.9.output.dense.down.weight"] = torch.zeros(1)
        message = "unexpected keys"
    elif fault == "shape":
        state[first] = torch.zeros(3, 3)
        message = "has shape \\(3, 3\\), the model expects \\(8, 32\\)"
    else:
        state[first] = state[first].double()
        message = "has dtype torch.float64, the model expects torch.float32"
    with pytest.raises(AdapterStateError, match=message):
        load_adapter_state_dict(model, state)
    after = adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ndarrays_from_another_size_are_refused() -> None:
    _, model = _adapted()
    other = tiny_model("bert")
    add_adapter(other, AdapterConfig.preset("houlsby", bottleneck_size=4))
    with pytest.raises(AdapterStateError, match="has shape \\(4, 32\\), the model expects \\(8, 32\\)"):
        from_ndarrays(model, to_ndarrays(other))
    with pytest.raises(AdapterStateError, match="got 17 arrays, adapter 'default' of this model has 18"):
        from_ndarrays(model, to_ndarrays(model)[:-1])
    with pytest.raises(AdapterStateError, match="expected a NumPy array"):
        from_ndarrays(model, [a.tolist() for a in to_ndarrays(model)])


def test_adapter_for_another_base_is_refused(tmp_path) -> None:
    _, model = _adapted("bert")
    save_adapter(model, tmp_path / "bert")
    other = tiny_model("gpt2")
    with pytest.raises(AdapterStateError, match="made for another base.*model_type 'bert' \\(adapter\\) vs 'gpt2'"):
        load_adapter(other, tmp_path / "bert")
    assert not getattr(other, "adapter_configs", {})  # refused before touching the model
    wrong_labels = tiny_model("bert", num_labels=5)
    with pytest.raises(AdapterStateError, match="num_labels 3 \\(adapter head\\) vs 5"):
        load_adapter(wrong_labels, tmp_path / "bert")


def test_missing_or_corrupted_files_are_clear_errors(tmp_path) -> None:
    _, model = _adapted()
    fresh = tiny_model("bert")
    with pytest.raises(AdapterStateError, match="does not exist; an adapter directory holds"):
        load_adapter(fresh, tmp_path / "nothing")
    directory = save_adapter(model, tmp_path / "a")
    (directory / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterStateError, match="cannot be read.*corrupted"):
        load_adapter(fresh, directory)
    assert not getattr(fresh, "adapter_configs", {})
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterStateError, match="not valid JSON"):
        load_adapter(fresh, directory)


def test_files_of_two_saves_are_not_loaded_as_one_adapter(tmp_path) -> None:
    """An interrupted save (new weights, old config) or files mixed from two adapters: refused, model untouched."""
    _, first = _adapted(seed=0)
    _, second = _adapted(seed=1)
    one, other = save_adapter(first, tmp_path / "one"), save_adapter(second, tmp_path / "other")
    (one / "adapter.safetensors").write_bytes((other / "adapter.safetensors").read_bytes())
    fresh = tiny_model("bert")
    with pytest.raises(AdapterStateError, match="come from different saves.*save the adapter again"):
        load_adapter(fresh, one)
    assert not getattr(fresh, "adapter_configs", {})
    # Saved again, the pair loads; files written before save ids (no id in the JSON) still load.
    save_adapter(first, one)
    load_adapter(tiny_model("bert"), one)
    metadata = json.loads((other / "adapter_config.json").read_text())
    del metadata["save_id"]
    (other / "adapter_config.json").write_text(json.dumps(metadata))
    load_adapter(tiny_model("bert"), other)


def test_unknown_adapter_name_is_an_error() -> None:
    _, model = _adapted()
    with pytest.raises(AdapterStateError, match="no adapter named 'nope'"):
        adapter_state_dict(model, "nope")


@pytest.mark.parametrize("kind", ["single", "stack", "fuse"])
def test_adapter_sets_round_trip_through_a_directory(tmp_path, kind: str) -> None:
    """A client's complete personal model (stacked or fused adapters, fusion, head) saves and loads as one."""
    from fed_adapters.adapters import Fuse, Stack, add_fusion, save_adapter_set, set_active_adapter

    model = tiny_model("bert")
    for i, name in enumerate(("shared", "private")):
        torch.manual_seed(i)
        add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=5.0), name=name)
    if kind == "stack":
        set_active_adapter(model, Stack("shared", "private"))
    elif kind == "fuse":
        fuse = add_fusion(model, ["shared", "private"], name="mix", dim=4)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if ".mix.query" in _:
                    p.normal_(std=1.0)
        set_active_adapter(model, fuse)
    else:
        set_active_adapter(model, "private")
    with torch.no_grad():
        model.classifier.weight.normal_()
    batch = tiny_batch()
    expected = logits(model, batch)
    save_adapter_set(model, tmp_path / "set")

    fresh = tiny_model("bert")
    active = load_adapter(fresh, tmp_path / "set")
    assert active == {"single": "private", "stack": str(Stack("shared", "private")),
                      "fuse": str(Fuse("shared", "private", fusion="mix"))}[kind]
    assert torch.equal(logits(fresh, batch), expected)
    other = tiny_model("bert", num_labels=5)
    with pytest.raises(AdapterStateError, match="num_labels 3 \\(adapter head\\) vs 5"):
        load_adapter(other, tmp_path / "set")
    assert not getattr(other, "adapter_configs", {})


def test_a_failed_load_leaves_the_active_adapter_and_trainable_flags_as_they_were(tmp_path) -> None:
    from fed_adapters.adapters import Stack, save_adapter_set, set_active_adapter

    source = tiny_model("bert")
    add_adapter(source, AdapterConfig(bottleneck_size=4), name="shared")
    add_adapter(source, AdapterConfig(bottleneck_size=4), name="private")
    set_active_adapter(source, Stack("shared", "private"))
    save_adapter_set(source, tmp_path / "set")
    save_adapter(source, tmp_path / "single", name="shared")
    for directory in ("set", "single"):  # damage: the config promises bottleneck 8, the tensors hold 4
        path = tmp_path / directory / "adapter_config.json"
        metadata = json.loads(path.read_text())
        for config in metadata.get("adapter_configs", {"shared": metadata.get("adapter_config")}).values():
            config["bottleneck_size"] = 8
        path.write_text(json.dumps(metadata))

    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4), name="mine")
    set_active_adapter(model, "mine", train_head=False)  # not the default flags: the head frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for directory in ("set", "single"):
        with pytest.raises(AdapterStateError, match="has shape"):
            load_adapter(model, tmp_path / directory)
        assert model.active_adapter == "mine" and set(model.adapter_configs) == {"mine"}
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_head_is_not_loaded_under_another_pooling(tmp_path) -> None:
    from fed_adapters.modeling import build_model
    import transformers as tf

    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    cls = build_model(config, num_labels=3, pooling="cls")
    add_adapter(cls, AdapterConfig(bottleneck_size=4))
    save_adapter(cls, tmp_path / "cls")
    mean = build_model(config, num_labels=3, pooling="mean")
    with pytest.raises(AdapterStateError, match="pooling 'cls' \\(the head reads that\\) vs 'mean'"):
        load_adapter(mean, tmp_path / "cls")
    assert not getattr(mean, "adapter_configs", {})


def test_a_fusion_is_saved_with_its_adapters_not_alone(tmp_path) -> None:
    from fed_adapters.adapters import add_fusion

    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4), name="a")
    add_adapter(model, AdapterConfig(bottleneck_size=4), name="b")
    add_fusion(model, ["a", "b"], name="mix")
    with pytest.raises(AdapterStateError, match="'mix' is a fusion, not an adapter; .* save_adapter_set"):
        save_adapter(model, tmp_path / "mix", name="mix")
    assert not (tmp_path / "mix").exists()
