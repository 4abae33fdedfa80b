"""Managing named adapters on a frozen base: add, activate, deactivate, delete, route per example.

The model keeps its registry in `model.adapter_configs` (name -> AdapterConfig) and
`model.active_adapter`; the weights live in `AdapterLayer` children of the hooked modules, attribute
`ADAPTER_ATTR`, so `model.to(device)` and `model.parameters()` see them like any other weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .config import AdapterConfig, AdapterConfigError
from .layer import AdapterLayer, AdapterRoutingError, BottleneckAdapter, routing_ids
from .targets import find_insertion_points

ADAPTER_ATTR = "bottleneck_adapters"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def add_adapter(model: nn.Module, config: AdapterConfig | None = None, name: str = "default") -> nn.Module:
    """Inserts a new adapter called `name`, freezes the base and makes this adapter the active, trainable one.

    Insertion points come from `model.config.model_type` (see `targets.ARCHITECTURES`) or from
    `config.target_modules`. Returns the same model, modified in place.
    """
    config = config or AdapterConfig()
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterConfigError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-'")
    if name in adapter_configs(model):
        raise AdapterConfigError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick a new name")
    points = find_insertion_points(model, config)
    d_model = int(model.config.hidden_size)
    modules = dict(model.named_modules())
    reference = next(model.parameters())
    for point in points:
        output_module = modules[point.output_module]
        layer = getattr(output_module, ADAPTER_ATTR, None)
        if layer is None:
            layer = AdapterLayer(output_module, modules[point.input_module])
            output_module.add_module(ADAPTER_ATTR, layer)
        layer[name] = BottleneckAdapter(d_model, config).to(reference.device)
    model.adapter_configs = {**adapter_configs(model), name: config}
    set_active_adapter(model, name)
    return model


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return dict(getattr(model, "adapter_configs", {}))


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(hooked module name, its AdapterLayer) in module order."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield module_name.removesuffix("." + ADAPTER_ATTR), module


def head_parameter_names(model: nn.Module) -> list[str]:
    """Task-head parameters: everything outside `model.base_model` (classifier, score, pooler head...).

    Parameters tied to the base (a language-model head sharing the embedding matrix) are excluded:
    they are base weights and stay frozen.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    base_ids = {id(p) for p in base.parameters()}
    return [n for n, p in model.named_parameters() if id(p) not in base_ids and f".{ADAPTER_ATTR}." not in f".{n}"]


def freeze_base(model: nn.Module, train_head: bool = True) -> None:
    """Freezes every parameter except the task head (when `train_head`)."""
    head = set(head_parameter_names(model)) if train_head else set()
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name in head)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Makes `name` the adapter every forward pass uses and the only trainable one (plus its head).

    `None` deactivates all adapters: the model computes exactly the base model's outputs.
    """
    configs = adapter_configs(model)
    if name is not None and name not in configs:
        raise AdapterConfigError(f"no adapter named {name!r}; this model has {sorted(configs) or 'none'}")
    freeze_base(model, train_head=configs[name].train_head if name is not None else False)
    for _, layer in adapter_layers(model):
        layer.active = name
        for adapter_name, adapter in layer.items():
            adapter.requires_grad_(adapter_name == name)
    model.active_adapter = name


def deactivate_adapters(model: nn.Module) -> None:
    set_active_adapter(model, None)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes an adapter's weights everywhere; hooks go with the last adapter at each point."""
    configs = adapter_configs(model)
    if name not in configs:
        raise AdapterConfigError(f"no adapter named {name!r}; this model has {sorted(configs) or 'none'}")
    modules = dict(model.named_modules())
    for module_name, layer in list(adapter_layers(model)):
        if name in layer:
            del layer[name]
        if len(layer) == 0:
            layer.remove_hooks()
            delattr(modules[module_name], ADAPTER_ATTR)
    del configs[name]
    model.adapter_configs = configs
    if getattr(model, "active_adapter", None) == name:
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
