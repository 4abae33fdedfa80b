"""Where a client keeps what never leaves it: one safetensors file per client, written atomically.

In simulation every virtual client shares its Ray actor's base model, so its private tensors cannot
live in that model between calls; they live here, keyed by partition id, and survive rounds and
restarts. A client costs only its private tensors on disk, never a copy of the base.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class PrivateStateError(RuntimeError):
    """A client's private state cannot be read back."""


class PrivateStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, client: int) -> Path:
        return self.directory / f"client-{client:05d}.safetensors"

    def holds(self, client: int) -> bool:
        """Whether the client has saved its state (it trained at least once)."""
        return self.path(client).exists()

    def load(self, client: int) -> dict[str, torch.Tensor] | None:
        """The client's tensors, or None before its first save."""
        path = self.path(client)
        if not self.holds(client):
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise PrivateStateError(
                f"private state of client {client} in {path} cannot be read ({error}); "
                "delete the file to start that client afresh"
            ) from None

    def save(self, client: int, tensors: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".client-{client:05d}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.path(client))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clients(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("client-*.safetensors"))
