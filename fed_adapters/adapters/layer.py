"""The adapter modules: one bottleneck, and the per-sublayer container that hooks it into the base.

Adapters attach through forward hooks instead of replacing base modules, so the base model's own
parameter names, weights and code paths stay untouched: with no adapter active a hooked model *is* the
base model, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

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


@dataclass(frozen=True, init=False)
class Stack:
    """Adapters applied one after another at every insertion point: `Stack("shared", "private")` feeds the
    shared adapter's output to the private one (MAD-X's language-then-task stacking)."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        object.__setattr__(self, "names", tuple(names))


@dataclass(frozen=True, init=False)
class Fuse:
    """AdapterFusion (Pfeiffer et al. 2021): per token, learned attention over what each adapter adds.
    The attention's weights are a module of their own, named `fusion` (see `add_fusion`)."""

    names: tuple[str, ...]
    fusion: str

    def __init__(self, *names: str, fusion: str = "fusion") -> None:
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "fusion", fusion)


Composition = Union[str, Stack, Fuse]


def composition_members(active: Composition | None) -> list[str]:
    """Every named module a composition uses: its adapters and, for `Fuse`, the fusion."""
    if active is None:
        return []
    if isinstance(active, str):
        return [active]
    return [*active.names, *([active.fusion] if isinstance(active, Fuse) else [])]


class AdapterFusion(nn.Module):
    """Mixes adapters' residual branches: `sum_i softmax_i(q(h) . k(h + delta_i)) * delta_i`.

    The values are the adapters' own outputs (the identity value matrix AdapterFusion starts from), which
    keeps the fusion small (2 x d x `dim` per insertion point); a zero query starts it as a plain average.
    """

    def __init__(self, d_model: int, dim: int = 64, temperature: float = 1.0) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, dim)
        self.key = nn.Linear(d_model, dim)
        self.temperature = float(temperature)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)

    def forward(self, hidden: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        hidden = hidden.to(self.query.weight.dtype)
        stacked = torch.stack([d.to(hidden.dtype) for d in deltas], dim=-2)  # (..., adapters, d)
        query = self.query(hidden).unsqueeze(-1)  # (..., dim, 1)
        keys = self.key(hidden.unsqueeze(-2) + stacked)  # (..., adapters, dim)
        scores = (keys @ query).squeeze(-1) / (math.sqrt(keys.shape[-1]) * self.temperature)
        return (scores.softmax(dim=-1).unsqueeze(-1) * stacked).sum(dim=-2)


class AdapterLayer(nn.ModuleDict):
    """All named adapters at one insertion point, and the hooks that apply the selected one(s).

    Selection is either one active adapter for the whole batch, or per-example routing: a list of
    adapter names and, for each example, the index of its adapter; routing runs every example through
    its own adapter with batched matmuls over the stacked weights, in one pass.
    """

    def __init__(self, output_module: nn.Module, input_module: nn.Module) -> None:
        super().__init__()
        self.active: Composition | None = None
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
        """The adapters (not fusions) that act at this insertion point."""
        if self.routing is not None:
            names = self.routing[0]
            return names if any(n in self for n in names) else []
        if isinstance(self.active, Fuse):
            return list(self.active.names) if all(n in self for n in composition_members(self.active)) else []
        return [n for n in composition_members(self.active) if n in self]

    def _needs_input(self) -> bool:
        # Under routing some names may be missing here: _routed_delta then raises the error that says so.
        return any(name in self and self[name].config.placement == "parallel" for name in self._selected())

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._needs_input():
            self._sublayer_input = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        selected = self._selected()
        if not selected:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        if self.routing is not None:
            new_hidden = hidden + self._routed_delta(hidden).to(hidden.dtype)
        elif isinstance(self.active, Fuse):
            deltas = [self[n](self._adapter_input(self[n], hidden)) for n in selected]
            new_hidden = hidden + self[self.active.fusion](hidden, deltas).to(hidden.dtype)
        else:  # one adapter, or a stack: each adds its branch to the output of the one before
            new_hidden = hidden
            for name in selected:
                new_hidden = new_hidden + self[name](self._adapter_input(self[name], new_hidden)).to(hidden.dtype)
        self._sublayer_input = None
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
