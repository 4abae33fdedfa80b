"""Adapter mechanics: config, where adapters go, the modules, managing them, their state and files."""

from .accounting import ParameterCount, adapter_parameter_count, print_trainable_parameters, trainable_parameters
from .config import PRESETS, AdapterConfig, AdapterConfigError
from .layer import AdapterFusion, AdapterRoutingError, BottleneckAdapter, Composition, Fuse, Stack
from .model import (
    adapter_configs,
    adapter_routing,
    add_adapter,
    add_fusion,
    deactivate_adapters,
    delete_adapter,
    freeze_base,
    fusion_configs,
    head_parameter_names,
    set_active_adapter,
)
from .state import (
    AdapterStateError,
    adapter_state_dict,
    adapter_state_keys,
    from_ndarrays,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
    save_adapter_set,
    to_ndarrays,
)
from .targets import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterFusion",
    "AdapterRoutingError",
    "AdapterStateError",
    "BottleneckAdapter",
    "Composition",
    "Fuse",
    "ParameterCount",
    "Stack",
    "adapter_configs",
    "adapter_parameter_count",
    "adapter_routing",
    "adapter_state_dict",
    "adapter_state_keys",
    "add_adapter",
    "add_fusion",
    "deactivate_adapters",
    "delete_adapter",
    "freeze_base",
    "fusion_configs",
    "from_ndarrays",
    "head_parameter_names",
    "load_adapter",
    "load_adapter_state_dict",
    "print_trainable_parameters",
    "save_adapter",
    "save_adapter_set",
    "set_active_adapter",
    "to_ndarrays",
    "trainable_parameters",
]
