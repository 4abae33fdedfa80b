"""Managing named adapters on a frozen base: add, activate, deactivate, delete, route per example.

The model keeps its registry in `model.adapter_configs` (name -> AdapterConfig) and
`model.active_adapter`; the weights live in `AdapterLayer` children of the hooked modules, attribute
`ADAPTER_ATTR`, so `model.to(device)` and `model.parameters()` see them like any other weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .config import AdapterConfig, AdapterConfigError
from .layer import (
    AdapterFusion,
    AdapterLayer,
    AdapterRoutingError,
    BottleneckAdapter,
    Composition,
    Fuse,
    Stack,
    composition_members,
    routing_ids,
)
from .targets import find_insertion_points

ADAPTER_ATTR = "bottleneck_adapters"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def add_adapter(model: nn.Module, config: AdapterConfig | None = None, name: str = "default") -> nn.Module:
    """Inserts a new adapter called `name`, freezes the base and makes this adapter the active, trainable one.

    Insertion points come from `model.config.model_type` (see `targets.ARCHITECTURES`) or from
    `config.target_modules`. Returns the same model, modified in place.
    """
    config = config or AdapterConfig()
    _check_new_name(model, name)
    points = find_insertion_points(model, config)
    d_model = int(model.config.hidden_size)
    modules = dict(model.named_modules())
    reference = next(model.parameters())
    for point in points:
        output_module = modules[point.output_module]
        layer = getattr(output_module, ADAPTER_ATTR, None)
        if layer is None:
            layer = AdapterLayer(output_module, modules[point.input_module]).train(model.training)
            output_module.add_module(ADAPTER_ATTR, layer)
        # New modules follow the model's mode: an adapter added to a model in eval mode must not apply dropout.
        layer[name] = BottleneckAdapter(d_model, config).to(reference.device).train(model.training)
    model.adapter_configs = {**adapter_configs(model), name: config}
    set_active_adapter(model, name)
    return model


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return dict(getattr(model, "adapter_configs", {}))


def fusion_configs(model: nn.Module) -> dict[str, dict]:
    """Fusion name -> {"adapters": [...], "dim": ..., "temperature": ...}."""
    return dict(getattr(model, "fusion_configs", {}))


def add_fusion(model: nn.Module, adapters: Sequence[str], name: str = "fusion", dim: int = 64,
               temperature: float = 1.0) -> Fuse:
    """Adds AdapterFusion weights over `adapters` (which must sit at the same insertion points); returns the
    `Fuse` composition to activate. The adapters keep their weights; the fusion learns how to mix them."""
    configs = adapter_configs(model)
    _check_new_name(model, name)
    unknown = sorted(set(adapters) - set(configs))
    if unknown or len(set(adapters)) < 2:
        raise AdapterConfigError(
            f"a fusion needs two or more distinct existing adapters, got {list(adapters)}"
            + (f" ({unknown} unknown; this model has {sorted(configs)})" if unknown else "")
        )
    if dim < 1 or temperature <= 0:
        raise AdapterConfigError(f"fusion dim must be >= 1 and temperature > 0, got dim={dim}, temperature={temperature}")
    layers = [layer for _, layer in adapter_layers(model) if any(a in layer for a in adapters)]
    if any(not all(a in layer for a in adapters) for layer in layers):
        raise AdapterConfigError(f"adapters {list(adapters)} do not sit at the same insertion points; fuse adapters of one layout")
    reference = next(model.parameters())
    for layer in layers:
        # Trainable only once activated, like any module outside the active composition.
        fusion = AdapterFusion(int(model.config.hidden_size), dim, temperature).to(reference.device).train(model.training)
        layer[name] = fusion.requires_grad_(False)
    model.fusion_configs = {**fusion_configs(model), name: {"adapters": list(adapters), "dim": dim, "temperature": temperature}}
    return Fuse(*adapters, fusion=name)


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterConfigError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-'")
    if name in adapter_configs(model) or name in fusion_configs(model):
        raise AdapterConfigError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick a new name")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(hooked module name, its AdapterLayer) in module order."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield module_name.removesuffix("." + ADAPTER_ATTR), module


def head_parameter_names(model: nn.Module) -> list[str]:
    """Task-head parameters: everything outside `model.base_model` (classifier, score, pooler head...).

    A language model's output projection is a pretrained base weight, not a task head: tied to the
    embeddings (GPT-2) or not (Llama, Mistral, Qwen, whose `lm_head` is vocabulary x hidden, a sizeable share
    of the model), it stays frozen and never travels.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    base_ids = {id(p) for p in base.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        base_ids.update(id(p) for p in output.parameters())
    return [n for n, p in model.named_parameters() if id(p) not in base_ids and f".{ADAPTER_ATTR}." not in f".{n}"]


def freeze_base(model: nn.Module, train_head: bool = True) -> None:
    """Freezes every parameter except the task head (when `train_head`)."""
    head = set(head_parameter_names(model)) if train_head else set()
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name in head)


def set_active_adapter(
    model: nn.Module, active: Composition | None, train: Iterable[str] | None = None, train_head: bool | None = None
) -> None:
    """Makes `active` — an adapter name, a `Stack` or a `Fuse` — what every forward pass uses.

    Only `train` (default: the adapter; every adapter of a stack; the fusion of a `Fuse`) and, when
    `train_head` (default: the last adapter's config), the task head stay trainable. `None` deactivates
    all adapters: the model computes exactly the base model's outputs.
    """
    configs, fusions = adapter_configs(model), fusion_configs(model)
    members = composition_members(active)
    unknown = [n for n in members if n not in configs and n not in fusions]
    if unknown:
        raise AdapterConfigError(f"no adapter named {unknown[0]!r}; this model has {sorted({**configs, **fusions}) or 'none'}")
    # A fusion only mixes adapters: it runs as the `fusion` of a Fuse, never as an adapter (name or Stack member).
    adapter_slots = list(active.names) if isinstance(active, (Stack, Fuse)) else [] if active is None else [active]
    misplaced = [n for n in adapter_slots if n in fusions]
    if misplaced:
        raise AdapterConfigError(f"{misplaced[0]!r} is a fusion, not an adapter: activate it as "
                                 f"Fuse({', '.join(map(repr, fusions[misplaced[0]]['adapters']))}, fusion={misplaced[0]!r})")
    if isinstance(active, Fuse) and active.fusion not in fusions:
        raise AdapterConfigError(f"{active.fusion!r} is not a fusion; this model's fusions: {sorted(fusions) or 'none'} "
                                 "(add_fusion creates one)")
    if isinstance(active, Fuse) and sorted(fusions[active.fusion]["adapters"]) != sorted(active.names):
        raise AdapterConfigError(
            f"fusion {active.fusion!r} was built over {fusions[active.fusion]['adapters']}, not {list(active.names)}"
        )
    if train is None:
        train = [active.fusion] if isinstance(active, Fuse) else [n for n in members if n in configs]
    train = set(train)
    adapters = [n for n in members if n in configs]
    freeze_base(model, train_head=(configs[adapters[-1]].train_head if adapters else False) if train_head is None else train_head)
    for _, layer in adapter_layers(model):
        layer.active = active
        for module_name, module in layer.items():
            module.requires_grad_(module_name in train)
    model.active_adapter = active


def deactivate_adapters(model: nn.Module) -> None:
    set_active_adapter(model, None)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes an adapter's (or a fusion's) weights everywhere; hooks go with the last one at each point."""
    configs, fusions = adapter_configs(model), fusion_configs(model)
    if name not in configs and name not in fusions:
        raise AdapterConfigError(f"no adapter named {name!r}; this model has {sorted({**configs, **fusions}) or 'none'}")
    users = [f for f, spec in fusions.items() if name in spec["adapters"]]
    if users:
        raise AdapterConfigError(f"fusion {users[0]!r} uses adapter {name!r}; delete_adapter(model, {users[0]!r}) first")
    modules = dict(model.named_modules())
    for module_name, layer in list(adapter_layers(model)):
        if name in layer:
            del layer[name]
        if len(layer) == 0:
            layer.remove_hooks()
            delattr(modules[module_name], ADAPTER_ATTR)
    if name in fusions:
        del fusions[name]
        model.fusion_configs = fusions
    else:
        del configs[name]
        model.adapter_configs = configs
    if name in composition_members(getattr(model, "active_adapter", None)):
        deactivate_adapters(model)


@contextmanager
def adapter_routing(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, example i of every batch goes through adapter `adapter_names[i]`.

    All examples are computed in one forward pass (batched matmuls over stacked adapter weights).
    """
    configs = adapter_configs(model)
    unknown = sorted(set(adapter_names) - set(configs))
    if unknown:
        raise AdapterRoutingError(f"unknown adapter(s) {unknown} in routing; this model has {sorted(configs) or 'none'}")
    if not adapter_names:
        raise AdapterRoutingError("routing needs one adapter name per example, got an empty list")
    routing = routing_ids(adapter_names)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None
