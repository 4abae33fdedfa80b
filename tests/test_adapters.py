"""Adapter mechanics on tiny random-init models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_batch, tiny_model, logits
from torch.utils.data import DataLoader

from fed_adapters.adapters import (
    AdapterConfig,
    AdapterConfigError,
    AdapterFusion,
    AdapterRoutingError,
    BottleneckAdapter,
    Fuse,
    Stack,
    adapter_configs,
    adapter_parameter_count,
    adapter_routing,
    adapter_state_keys,
    add_adapter,
    add_fusion,
    deactivate_adapters,
    delete_adapter,
    fusion_configs,
    set_active_adapter,
    trainable_parameters,
)
from fed_adapters.adapters.layer import AdapterLayer
from fed_adapters.adapters.targets import find_insertion_points
from fed_adapters.training import train

LAYOUTS = [
    AdapterConfig.preset("houlsby", bottleneck_size=8),
    AdapterConfig.preset("pfeiffer", bottleneck_size=8),
    AdapterConfig(bottleneck_size=8, location="attention", placement="parallel"),
    AdapterConfig.preset("parallel", bottleneck_size=8),
]


def _adapter_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".bottleneck_adapters." in n}


@pytest.mark.parametrize("config", LAYOUTS, ids=["houlsby", "pfeiffer", "attn-parallel", "parallel"])
def test_identity_init_leaves_logits_unchanged(family: str, config: AdapterConfig) -> None:
    model = tiny_model(family)
    batch = tiny_batch()
    before = logits(model, batch)
    add_adapter(model, config)
    assert _adapter_names(model), "no adapter was inserted"
    assert torch.equal(logits(model, batch), before)


def test_adapter_changes_output_and_deactivation_restores_base(family: str) -> None:
    model = tiny_model(family)
    batch = tiny_batch()
    base = logits(model, batch)
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=8, init="bert", scaling=20.0))
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, base)
    deactivate_adapters(model)
    assert torch.equal(logits(model, batch), base)
    set_active_adapter(model, "default")
    assert torch.equal(logits(model, batch), adapted)


def test_every_location_is_hooked(family: str) -> None:
    model = tiny_model(family)
    points = find_insertion_points(model, AdapterConfig(location="both"))
    stacks = 2 if family == "t5" else 1  # T5: encoder and decoder stacks
    assert sorted(p.location for p in points) == ["attention"] * 2 * stacks + ["ffn"] * 2 * stacks
    assert sorted({p.layer for p in points}) == [0, 1]


def test_training_moves_only_adapter_and_head(family: str) -> None:
    model = tiny_model(family)
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=8))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = tiny_batch(batch_size=8)
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(8)], batch_size=4)
    # Gradients reach adapter and head parameters only.
    model.train()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    model.zero_grad(set_to_none=True)

    stats = train(model, loader, max_steps=3, lr=1e-2, warmup_ratio=0.0, device="cpu")
    assert stats.steps == 3 and stats.examples == 12
    for name, value in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), f"base weight {name} changed"
    changed = [n for n, v in trained_before.items() if not torch.equal(dict(model.named_parameters())[n], v)]
    assert any(".bottleneck_adapters." in n for n in changed)
    assert all(".bottleneck_adapters." in n or n in _head_names(model) for n in trained_before)


def _head_names(model: torch.nn.Module) -> set[str]:
    from fed_adapters.adapters import head_parameter_names

    return set(head_parameter_names(model))


@pytest.mark.parametrize("d_model,bottleneck", [(32, 8), (384, 16), (768, 64)])
def test_one_adapter_has_2dm_plus_d_plus_m_parameters(d_model: int, bottleneck: int) -> None:
    adapter = BottleneckAdapter(d_model, AdapterConfig(bottleneck_size=bottleneck))
    expected = 2 * d_model * bottleneck + d_model + bottleneck
    assert adapter_parameter_count(d_model, bottleneck) == expected
    assert sum(p.numel() for p in adapter.parameters()) == expected


def test_trainable_parameter_accounting(capsys) -> None:
    model = tiny_model("bert")
    total_base = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=8))
    count = trainable_parameters(model)
    adapters = 2 * 2 * adapter_parameter_count(32, 8)  # 2 layers x (attention + ffn)
    assert count.trainable == adapters + head
    assert count.total == total_base + adapters
    assert count.percent == pytest.approx(100 * (adapters + head) / (total_base + adapters))
    from fed_adapters import print_trainable_parameters

    print_trainable_parameters(model)
    assert f"trainable params: {adapters + head:,} || all params: {total_base + adapters:,}" in capsys.readouterr().out


def test_train_head_false_freezes_the_head() -> None:
    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4, train_head=False))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _adapter_names(model)


def test_layers_and_leave_out_select_layers() -> None:
    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4, leave_out=1), name="top")
    assert all(".layer.1." in n for n in _adapter_names(model))
    add_adapter(model, AdapterConfig(bottleneck_size=4, layers=[0], location="ffn"), name="bottom")
    bottom = {n for n in _adapter_names(model) if ".bottom." in n}
    assert bottom and all(".layer.0.output.dense." in n for n in bottom)


def test_a_deeper_decoder_gets_adapters_in_every_block() -> None:
    import transformers as tf
    from fed_adapters.modeling import build_model

    config = tf.T5Config(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=4, num_heads=2, vocab_size=64,
                         decoder_start_token_id=0)
    model = build_model(config, num_labels=2, pooling="model")
    points = find_insertion_points(model, AdapterConfig(location="ffn"))
    assert sorted({p.layer for p in points if ".decoder." in p.output_module}) == [0, 1, 2, 3]
    assert sorted({p.layer for p in points if ".encoder." in p.output_module}) == [0, 1]
    top = find_insertion_points(model, AdapterConfig(location="ffn", layers=[3]))
    assert top and all(".decoder." in p.output_module for p in top)


def test_reduction_factor_sets_the_bottleneck() -> None:
    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(reduction_factor=4, location="ffn"))
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("down.weight")}
    assert shapes == {(8, 32)}


@pytest.mark.parametrize("family_name", ["bert", "distilbert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_per_example_routing_equals_one_by_one(family_name: str, placement: str) -> None:
    model = tiny_model(family_name)
    names = ["alice", "bob", "carol"]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        add_adapter(model, AdapterConfig(bottleneck_size=8, placement=placement, init="bert", scaling=10.0), name=name)
    model.eval()
    batch = tiny_batch(batch_size=6, labels=None)
    routed_names = ["bob", "alice", "carol", "carol", "alice", "bob"]
    with adapter_routing(model, routed_names):
        routed = logits(model, batch)
    for i, name in enumerate(routed_names):
        set_active_adapter(model, name)
        alone = logits(model, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(routed[i : i + 1], alone, atol=1e-5, rtol=0)
    # Routing really distinguishes adapters: the same example under two adapters differs.
    with adapter_routing(model, ["alice", "bob", "alice", "bob", "alice", "bob"]):
        other = logits(model, batch)
    assert not torch.allclose(other[0], routed[0])


def test_routing_is_one_batched_pass_without_python_loop_over_examples() -> None:
    model = tiny_model("bert")
    for name in ("a", "b"):
        add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert"), name=name)
    calls = []
    handle = model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda *_: calls.append(1))
    with adapter_routing(model, ["a", "b", "a", "b"]):
        logits(model, tiny_batch(batch_size=4))
    handle.remove()
    assert calls == [1]  # the hooked sublayer ran once for the whole mixed batch


def test_routing_errors() -> None:
    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4), name="a")
    add_adapter(model, AdapterConfig(bottleneck_size=8), name="b")
    with pytest.raises(AdapterRoutingError, match="unknown adapter"):
        with adapter_routing(model, ["a", "zed"]):
            pass
    with pytest.raises(AdapterRoutingError, match="differ in size"):
        with adapter_routing(model, ["a", "b"]):
            logits(model, tiny_batch(batch_size=2))
    with pytest.raises(AdapterRoutingError, match="3 adapter ids for a batch of 2"):
        with adapter_routing(model, ["a", "a", "a"]):
            logits(model, tiny_batch(batch_size=2))
    # Adapters on different layers: the routing error, for sequential and parallel adapters alike.
    for placement in ("sequential", "parallel"):
        model = tiny_model("bert")
        add_adapter(model, AdapterConfig(bottleneck_size=4, placement=placement), name="a")
        add_adapter(model, AdapterConfig(bottleneck_size=4, placement=placement, layers=[1]), name="b")
        with pytest.raises(AdapterRoutingError, match=r"\['b'\] have no weights at this layer while \['a'\] do"):
            with adapter_routing(model, ["a", "b"]):
                logits(model, tiny_batch(batch_size=2))


def test_adapters_added_to_a_model_in_eval_mode_apply_no_dropout() -> None:
    model = tiny_model("bert")  # eval mode
    add_adapter(model, AdapterConfig(bottleneck_size=4, dropout=0.5, init="bert", scaling=10.0), name="a")
    add_adapter(model, AdapterConfig(bottleneck_size=4, dropout=0.5, init="bert", scaling=10.0), name="b")
    add_fusion(model, ["a", "b"], name="ab")
    assert not any(module.training for module in model.modules())
    batch = tiny_batch()
    for active in ("a", Fuse("a", "b", fusion="ab")):
        set_active_adapter(model, active)
        torch.testing.assert_close(logits(model, batch), logits(model, batch), atol=0, rtol=0)
    model.train()
    add_adapter(model, AdapterConfig(bottleneck_size=4), name="c")
    assert all(module.training for module in model.modules())


def test_several_adapters_add_activate_delete() -> None:
    model = tiny_model("bert")
    base_keys = set(model.state_dict())
    batch = tiny_batch()
    base = logits(model, batch)
    for i, name in enumerate(("x", "y")):
        torch.manual_seed(i)
        add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=20.0), name=name)
    assert sorted(adapter_configs(model)) == ["x", "y"]
    assert model.active_adapter == "y"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".bottleneck_adapters." in n}
    assert trainable and all(".y." in n for n in trainable)
    out_y = logits(model, batch)
    set_active_adapter(model, "x")
    out_x = logits(model, batch)
    assert not torch.allclose(out_x, out_y)
    delete_adapter(model, "x")
    assert model.active_adapter is None and torch.equal(logits(model, batch), base)
    set_active_adapter(model, "y")
    assert torch.equal(logits(model, batch), out_y)
    delete_adapter(model, "y")
    assert set(model.state_dict()) == base_keys and torch.equal(logits(model, batch), base)
    with pytest.raises(AdapterConfigError, match="no adapter named 'y'"):
        set_active_adapter(model, "y")


def test_explicit_target_modules_work_on_an_unmapped_architecture() -> None:
    import transformers as tf

    from fed_adapters.modeling import build_model

    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                          word_embed_proj_dim=32, pad_token_id=0)
    model = build_model(config, num_labels=3, pooling="model").eval()
    batch = tiny_batch()
    base = logits(model, batch)
    with pytest.raises(AdapterConfigError, match="no adapter mapping for model_type 'opt'.*target_modules"):
        add_adapter(model, AdapterConfig())
    add_adapter(model, AdapterConfig(bottleneck_size=4, target_modules=[r".*layers\.\d+\.fc2"]))
    assert len(_adapter_names(model)) == 2 * 4
    assert torch.equal(logits(model, batch), base)
    add_adapter(model, AdapterConfig(bottleneck_size=4, target_modules=["self_attn"], placement="parallel",
                                     init="bert", scaling=10.0), name="whole")
    assert not torch.allclose(logits(model, batch), base)  # tuple-returning sublayers are adapted too


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bottleneck_size=8, reduction_factor=4), "either bottleneck_size or reduction_factor"),
        (dict(bottleneck_size=0), "bottleneck_size must be an integer >= 1"),
        (dict(non_linearity="softsign"), "unknown non_linearity 'softsign'; valid values: relu, gelu"),
        (dict(location="everywhere"), "unknown location 'everywhere'; valid values: ffn, attention, both"),
        (dict(placement="diagonal"), "unknown placement"),
        (dict(init="zeros"), "unknown init 'zeros'; valid values: identity, normal, xavier, bert"),
        (dict(dropout=1.5), "dropout must be a number in"),
        (dict(layers=[]), "layers must be a non-empty list"),
        (dict(leave_out=-1), "leave_out must be an integer >= 0"),
        (dict(target_modules="mlp"), "target_modules must be a non-empty list"),
        (dict(scaling=float("nan")), "scaling must be a finite number"),
        (dict(scaling=float("inf")), "scaling must be a finite number"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(AdapterConfigError, match=message):
        AdapterConfig(**kwargs)


def test_config_errors_that_need_the_model() -> None:
    model = tiny_model("bert")
    with pytest.raises(AdapterConfigError, match=r"bottleneck of 64, which must lie in \[1, d_model=32\]"):
        add_adapter(model, AdapterConfig(bottleneck_size=64))
    with pytest.raises(AdapterConfigError, match="reduction_factor=64"):
        add_adapter(model, AdapterConfig(reduction_factor=64))
    with pytest.raises(AdapterConfigError, match=r"layers \[5\] do not exist: the model has 2 layers"):
        add_adapter(model, AdapterConfig(layers=[5]))
    with pytest.raises(AdapterConfigError, match="no layer is left"):
        add_adapter(model, AdapterConfig(leave_out=2))
    with pytest.raises(AdapterConfigError, match="match no module"):
        add_adapter(model, AdapterConfig(target_modules=["nonexistent"]))
    # A projection to another width cannot hold an adapter of the hidden width; a container never runs.
    with pytest.raises(AdapterConfigError, match=r"'bert.encoder.layer.0.intermediate.dense' outputs 48 features, not the "
                                                 r"hidden size 32"):
        add_adapter(model, AdapterConfig(target_modules=["intermediate.dense"]))
    with pytest.raises(AdapterConfigError, match=r"match 'bert.encoder.layer', a ModuleList that never runs"):
        add_adapter(model, AdapterConfig(target_modules=["encoder.layer"]))
    with pytest.raises(AdapterConfigError, match=r"unknown adapter preset \['houlsby'\]"):
        AdapterConfig.from_dict({"preset": ["houlsby"]})
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    with pytest.raises(AdapterConfigError, match="already exists"):
        add_adapter(model, AdapterConfig(bottleneck_size=4))
    with pytest.raises(AdapterConfigError, match="must be non-empty letters"):
        add_adapter(model, AdapterConfig(bottleneck_size=4), name="a.b")
    assert list(adapter_configs(model)) == ["default"]  # failed adds left nothing behind


def test_config_json_round_trip_and_presets() -> None:
    config = AdapterConfig.preset("parallel", bottleneck_size=12, layers=[3, 1, 1], non_linearity="gelu")
    assert config.placement == "parallel" and config.scaling == 4.0 and config.layers == [1, 3]
    assert AdapterConfig.from_json(config.to_json()) == config
    assert AdapterConfig.from_dict({"preset": "pfeiffer", "bottleneck_size": 4}).location == "ffn"
    with pytest.raises(AdapterConfigError, match="unknown adapter config key.*bottleneck; valid keys"):
        AdapterConfig.from_dict({"bottleneck": 4})
    with pytest.raises(AdapterConfigError, match="unknown adapter preset 'lora'"):
        AdapterConfig.preset("lora")


@pytest.mark.parametrize("init", ["normal", "xavier", "bert"])
def test_other_inits_are_small_but_nonzero(init: str) -> None:
    adapter = BottleneckAdapter(64, AdapterConfig(bottleneck_size=8, init=init))
    assert adapter.up.weight.abs().sum() > 0 and torch.count_nonzero(adapter.up.bias) == 0
    limit = {"normal": 0.01, "xavier": 0.5, "bert": 0.2}[init]
    assert adapter.up.weight.abs().max() < limit


def test_models_of_every_family_are_covered() -> None:
    from fed_adapters.adapters import ARCHITECTURES

    required = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "gpt2", "llama",
                "mistral", "qwen2", "qwen3", "t5"}
    assert required <= set(ARCHITECTURES) and required == set(FAMILIES)


def test_deepcopy_keeps_adapters_working() -> None:
    model = tiny_model("bert")
    add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=10.0))
    clone = copy.deepcopy(model)
    batch = tiny_batch()
    assert torch.equal(logits(clone, batch), logits(model, batch))


def _hooked_linear(*names: str) -> tuple[torch.nn.Linear, AdapterLayer]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 8)
    layer = AdapterLayer(linear, linear)
    for name in names:
        layer[name] = BottleneckAdapter(8, AdapterConfig(bottleneck_size=4, init="bert", scaling=5.0))
    return linear, layer


def test_stack_feeds_each_adapter_the_output_of_the_one_before() -> None:
    linear, layer = _hooked_linear("a", "b")
    x = torch.randn(3, 8)
    y = torch.nn.functional.linear(x, linear.weight, linear.bias)
    layer.active = Stack("a", "b")
    after_a = y + layer["a"](y)
    assert torch.allclose(linear(x), after_a + layer["b"](after_a), atol=1e-6)
    layer.active = Stack("b", "a")
    assert not torch.allclose(linear(x), after_a + layer["b"](after_a))  # order matters


def test_fusion_starts_as_the_average_and_learns_to_weigh() -> None:
    linear, layer = _hooked_linear("a", "b")
    layer["f"] = AdapterFusion(8, dim=4)
    x = torch.randn(3, 8)
    y = torch.nn.functional.linear(x, linear.weight, linear.bias)
    layer.active = Fuse("a", "b", fusion="f")
    assert torch.allclose(linear(x), y + (layer["a"](y) + layer["b"](y)) / 2, atol=1e-6)
    with torch.no_grad():
        layer["f"].query.weight.normal_(std=3.0)
        layer["f"].key.weight.normal_(std=3.0)
    out = linear(x) - y
    weight_a = (out - layer["b"](y)) / (layer["a"](y) - layer["b"](y))  # per coordinate, equal within a token
    assert torch.allclose(weight_a, weight_a[:, :1].expand_as(weight_a), atol=1e-3)
    assert ((weight_a[:, 0] > 0) & (weight_a[:, 0] < 1)).all() and not torch.allclose(weight_a[:, 0], torch.full((3,), 0.5))


def test_compositions_on_a_model_train_what_they_should() -> None:
    model = tiny_model("bert")
    batch = tiny_batch()
    add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=5.0), name="shared")
    add_adapter(model, AdapterConfig(bottleneck_size=4, init="bert", scaling=5.0), name="private")
    set_active_adapter(model, "shared")
    shared_only = logits(model, batch)

    set_active_adapter(model, Stack("shared", "private"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".bottleneck_adapters." in n}
    assert {n.split(".bottleneck_adapters.")[1].split(".")[0] for n in trainable} == {"shared", "private"}
    assert not torch.allclose(logits(model, batch), shared_only)
    set_active_adapter(model, Stack("shared", "private"), train=["private"])
    assert all(".private." in n for n, p in model.named_parameters() if p.requires_grad and ".bottleneck_adapters." in n)

    fuse = add_fusion(model, ["shared", "private"], name="mix", dim=8)
    assert fuse == Fuse("shared", "private", fusion="mix")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)  # not active yet
    # A fusion is the mixer of a Fuse, never an adapter itself; a Fuse needs a fusion.
    for misuse in ("mix", Stack("shared", "mix")):
        with pytest.raises(AdapterConfigError, match=r"'mix' is a fusion, not an adapter: activate it as "
                                                     r"Fuse\('shared', 'private', fusion='mix'\)"):
            set_active_adapter(model, misuse)
    with pytest.raises(AdapterConfigError, match=r"'shared' is not a fusion; this model's fusions: \['mix'\]"):
        set_active_adapter(model, Fuse("shared", "private", fusion="shared"))
    assert model.active_adapter == Stack("shared", "private")  # refused compositions changed nothing
    set_active_adapter(model, fuse)
    assert model.active_adapter == fuse
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, DataLoader([batch] * 3, batch_size=None), max_steps=3, lr=1e-2, device="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mix." in n or n.startswith("classifier.") for n in changed)  # fusion (and head) only
    keys = adapter_state_keys(model, "mix")
    assert keys and all(k.endswith(("query.weight", "query.bias", "key.weight", "key.bias")) for k in keys)

    with pytest.raises(AdapterConfigError, match="fusion 'mix' uses adapter 'private'; delete_adapter\\(model, 'mix'\\) first"):
        delete_adapter(model, "private")
    with pytest.raises(AdapterConfigError, match="fusion 'mix' was built over"):
        set_active_adapter(model, Fuse("shared", "shared", fusion="mix"))
    with pytest.raises(AdapterConfigError, match="two or more distinct existing adapters"):
        add_fusion(model, ["shared", "ghost"], name="other")
    delete_adapter(model, "mix")
    assert model.active_adapter is None and "mix" not in fusion_configs(model)
    delete_adapter(model, "private")
