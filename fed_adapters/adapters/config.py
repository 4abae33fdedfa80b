"""`AdapterConfig`: what a bottleneck adapter is, validated at construction.

A config is plain data: it round-trips through JSON (it travels inside `adapter_config.json` and
federated run configs), and every invalid value fails here, with the fix in the message, instead of deep
inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

NON_LINEARITIES = ("relu", "gelu", "silu", "swish", "tanh", "leaky_relu")
LOCATIONS = ("ffn", "attention", "both")
PLACEMENTS = ("sequential", "parallel")
INITS = ("identity", "normal", "xavier", "bert")

# Named presets: the three canonical layouts of the literature.
PRESETS: dict[str, dict[str, Any]] = {
    # Houlsby et al. 2019: sequential adapters after both the attention and the feed-forward sublayer.
    "houlsby": {"location": "both", "placement": "sequential"},
    # Pfeiffer et al. 2021: one sequential adapter after the feed-forward sublayer.
    "pfeiffer": {"location": "ffn", "placement": "sequential"},
    # He et al. 2022: a parallel adapter beside the feed-forward sublayer, scaled by 4.
    "parallel": {"location": "ffn", "placement": "parallel", "scaling": 4.0},
}


class AdapterConfigError(ValueError):
    """An adapter configuration value is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class AdapterConfig:
    """Shape and placement of one bottleneck adapter `h + s * W_up(act(W_down h))`.

    Give the bottleneck either as an absolute `bottleneck_size` (m) or as a `reduction_factor`
    (m = d_model // reduction_factor); when neither is given the reduction factor is 16.
    """

    bottleneck_size: int | None = None
    reduction_factor: int | None = None
    non_linearity: str = "relu"
    location: str = "both"
    placement: str = "sequential"
    scaling: float = 1.0
    init: str = "identity"
    dropout: float = 0.0
    layers: list[int] | None = None
    leave_out: int = 0
    train_head: bool = True
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise AdapterConfigError(
                "give either bottleneck_size or reduction_factor, not both "
                f"(got bottleneck_size={self.bottleneck_size}, reduction_factor={self.reduction_factor})"
            )
        _check_int("bottleneck_size", self.bottleneck_size, minimum=1, optional=True)
        _check_int("reduction_factor", self.reduction_factor, minimum=1, optional=True)
        _check_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        _check_choice("location", self.location, LOCATIONS)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("init", self.init, INITS)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise AdapterConfigError(f"scaling must be a finite number, got {self.scaling!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise AdapterConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        _check_int("leave_out", self.leave_out, minimum=0)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise AdapterConfigError(f"layers must be a non-empty list of layer indices or null, got {self.layers!r}")
            for index in self.layers:
                _check_int("layers[]", index, minimum=0)
            object.__setattr__(self, "layers", sorted(set(self.layers)))
        if not isinstance(self.train_head, bool):
            raise AdapterConfigError(f"train_head must be true or false, got {self.train_head!r}")
        if self.target_modules is not None:
            if (
                not isinstance(self.target_modules, (list, tuple))
                or not self.target_modules
                or not all(isinstance(name, str) and name for name in self.target_modules)
            ):
                raise AdapterConfigError(
                    f"target_modules must be a non-empty list of module names or regexes, got {self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", list(self.target_modules))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AdapterConfig:
        """A named layout (`houlsby`, `pfeiffer`, `parallel`), with any field overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise AdapterConfigError(f"unknown adapter preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def bottleneck_for(self, d_model: int) -> int:
        """The bottleneck size m for a model of width `d_model`; errors if it does not fit."""
        if self.bottleneck_size is not None:
            size = self.bottleneck_size
            source = f"bottleneck_size={size}"
        else:
            factor = self.reduction_factor or 16
            size = d_model // factor
            source = f"reduction_factor={factor} (d_model={d_model})"
        if not 1 <= size <= d_model:
            raise AdapterConfigError(
                f"{source} gives a bottleneck of {size}, which must lie in [1, d_model={d_model}]; "
                "choose a size between 1 and the model's hidden size"
            )
        return size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Builds a config from a mapping; a key that is no field is an error that lists the valid ones."""
        if not isinstance(data, dict):
            raise AdapterConfigError(f"an adapter config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(
                f"unknown adapter config key(s) {', '.join(unknown)}; valid keys: preset, {', '.join(sorted(known))}"
            )
        return cls.preset(preset, **data) if preset is not None else cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AdapterConfigError(f"unknown {name} {value!r}; valid values: {', '.join(choices)}")


def _check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


__all__ = ["AdapterConfig", "AdapterConfigError", "PRESETS"]
