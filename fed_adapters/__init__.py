"""fed_adapters: federated and distributed bottleneck-adapter tuning of frozen Hugging Face transformers."""

__version__ = "0.1.0"

from .adapters import (  # noqa: E402  (the version must exist before submodules import it)
    AdapterConfig,
    adapter_routing,
    adapter_state_dict,
    add_adapter,
    deactivate_adapters,
    delete_adapter,
    from_ndarrays,
    load_adapter,
    load_adapter_state_dict,
    print_trainable_parameters,
    save_adapter,
    set_active_adapter,
    to_ndarrays,
    trainable_parameters,
)

__all__ = [
    "AdapterConfig",
    "__version__",
    "adapter_routing",
    "adapter_state_dict",
    "add_adapter",
    "deactivate_adapters",
    "delete_adapter",
    "from_ndarrays",
    "load_adapter",
    "load_adapter_state_dict",
    "print_trainable_parameters",
    "save_adapter",
    "set_active_adapter",
    "to_ndarrays",
    "trainable_parameters",
]
