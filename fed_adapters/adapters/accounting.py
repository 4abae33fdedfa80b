"""Parameter accounting: how much of the model trains, travels and gets stored."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (tied weights counted once), as PEFT reports them."""
    params = list(model.parameters())  # nn.Module.parameters() yields a tied tensor once
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_parameters(model))


def adapter_parameter_count(d_model: int, bottleneck: int) -> int:
    """Parameters of one bottleneck adapter: W_down (d*m) + b_down (m) + W_up (m*d) + b_up (d)."""
    return 2 * d_model * bottleneck + d_model + bottleneck
