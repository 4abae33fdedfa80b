"""The adapter modules: one bottleneck, and the per-sublayer container that hooks it into the base.

Adapters attach through forward hooks instead of replacing base modules, so the base model's own
parameter names, weights and code paths stay untouched: with no adapter active a hooked model *is* the
base model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


class AdapterRoutingError(ValueError):
    """A per-example routing request cannot be served (unknown or structurally different adapters)."""


class BottleneckAdapter(nn.Module):
    """`scaling * W_up(act(W_down x))`: the residual branch of one adapter (the caller adds it)."""

    def __init__(self, d_model: int, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.bottleneck = config.bottleneck_for(d_model)
        self.down = nn.Linear(d_model, self.bottleneck)
        self.up = nn.Linear(self.bottleneck, d_model)
        self.activation = _ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = float(config.scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.config.init
        if init == "identity":
            # W_down keeps nn.Linear's default init so that W_up receives gradient from step one.
            nn.init.zeros_(self.up.weight)
        elif init == "normal":
            nn.init.normal_(self.down.weight, std=1e-3)
            nn.init.normal_(self.up.weight, std=1e-3)
        elif init == "xavier":
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.xavier_uniform_(self.up.weight)
        elif init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype)
        return self.dropout(self.up(self.activation(self.down(x)))) * self.scaling

    def routing_signature(self) -> tuple[Any, ...]:
        """What must agree between adapters that share one batched forward pass."""
        c = self.config
        return (self.bottleneck, c.non_linearity, c.placement, self.scaling, c.dropout, self.down.weight.dtype)


class AdapterLayer(nn.ModuleDict):
    """All named adapters at one insertion point, and the hooks that apply the selected one(s).

    Selection is either one active adapter for the whole batch, or per-example routing: a list of
    adapter names and, for each example, the index of its adapter; routing runs every example through
    its own adapter with batched matmuls over the stacked weights, in one pass.
    """

    def __init__(self, output_module: nn.Module, input_module: nn.Module) -> None:
        super().__init__()
        self.active: str | None = None
        self.routing: tuple[list[str], torch.Tensor] | None = None
        self._sublayer_input: torch.Tensor | None = None
        self._handles = [
            output_module.register_forward_hook(self._on_output),
            input_module.register_forward_pre_hook(self._on_input, with_kwargs=True),
        ]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _selected(self) -> list[str]:
        if self.routing is not None:
            names = self.routing[0]
            return names if any(n in self for n in names) else []
        return [self.active] if self.active is not None and self.active in self else []

    def _needs_input(self) -> bool:
        return any(self[name].config.placement == "parallel" for name in self._selected() if name in self)

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._needs_input():
            self._sublayer_input = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        selected = self._selected()
        if not selected:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        if self.routing is not None:
            delta = self._routed_delta(hidden)
        else:
            adapter = self[selected[0]]
            delta = adapter(self._adapter_input(adapter, hidden))
        self._sublayer_input = None
        new_hidden = hidden + delta.to(hidden.dtype)
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

    def _adapter_input(self, adapter: BottleneckAdapter, hidden: torch.Tensor) -> torch.Tensor:
        return self._sublayer_input if adapter.config.placement == "parallel" else hidden

    def _routed_delta(self, hidden: torch.Tensor) -> torch.Tensor:
        names, ids = self.routing  # type: ignore[misc]
        missing = [n for n in names if n not in self]
        if missing:
            raise AdapterRoutingError(
                f"adapter(s) {missing} have no weights at this layer while {sorted(set(names) - set(missing))} do: "
                "routed adapters must cover the same layers and locations"
            )
        adapters: list[BottleneckAdapter] = [self[n] for n in names]
        first = adapters[0]
        for name, adapter in zip(names[1:], adapters[1:]):
            if adapter.routing_signature() != first.routing_signature():
                raise AdapterRoutingError(
                    f"adapters {names[0]!r} and {name!r} differ in size, activation, placement, scaling, dropout "
                    "or dtype; per-example routing batches only adapters of one shape"
                )
        x = self._adapter_input(first, hidden)
        if x.shape[0] != ids.shape[0]:
            raise AdapterRoutingError(f"routing gives {ids.shape[0]} adapter ids for a batch of {x.shape[0]} examples")
        ids = ids.to(x.device)
        batch, d_model = x.shape[0], x.shape[-1]
        x3 = x.reshape(batch, -1, d_model).to(first.down.weight.dtype)
        # Gather each example's weights from the stacked adapters: (B, d, m) and (B, m, d).
        w_down = torch.stack([a.down.weight for a in adapters])[ids].transpose(1, 2)
        b_down = torch.stack([a.down.bias for a in adapters])[ids].unsqueeze(1)
        w_up = torch.stack([a.up.weight for a in adapters])[ids].transpose(1, 2)
        b_up = torch.stack([a.up.bias for a in adapters])[ids].unsqueeze(1)
        h = first.activation(torch.baddbmm(b_down, x3, w_down))
        out = first.dropout(torch.baddbmm(b_up, h, w_up)) * first.scaling
        return out.reshape(x.shape[:-1] + (d_model,))


def routing_ids(names_per_example: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique adapter names (first-seen order) and each example's index into them."""
    unique = list(dict.fromkeys(names_per_example))
    index = {name: i for i, name in enumerate(unique)}
    return unique, torch.tensor([index[n] for n in names_per_example], dtype=torch.long)
