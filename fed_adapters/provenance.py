"""What produced a result: package versions and hardware, written beside every run's metrics."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from . import __version__


def environment() -> dict:
    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "fed_adapters": __version__,
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "flwr": installed("flwr"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
