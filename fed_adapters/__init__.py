"""fed_adapters: federated and distributed bottleneck-adapter tuning of frozen Hugging Face transformers.

The adapter API below is imported on first use, not with the package: a SuperNode's ClientApp process,
started afresh for every message, imports `fed_adapters.federated.client_app` and must not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

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


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".adapters", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
