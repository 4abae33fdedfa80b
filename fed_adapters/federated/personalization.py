"""Personalization: which tensors a client shares, which it keeps, and how each mode trains and evaluates.

`[personalization] mode`:
  none      one global adapter (and head) for everybody (FedAvg);
  finetune  the global adapter, fine-tuned for `finetune_steps` on the client before it is judged; the
            fine-tuned copy is thrown away, never sent;
  split     FedPer / FedRep: the shared adapter is averaged, a private part never leaves the client — the
            head, the top `private_layers` layers' adapters with the head, or a private adapter stacked on
            the shared one (MAD-X `Stack`) with the head;
  ditto     a private adapter and head trained beside the global ones and pulled toward them by
            lambda/2 * ||v - w||^2 (Li et al. 2021); the global ones train exactly as in FedAvg;
  fusion    AdapterFusion over the global and a private adapter, with a private head (Pfeiffer et al. 2021).

Every client shares one base model per process, so private tensors never stay in the model between calls:
they are restored from the client's `PrivateStore` (or initialised) when needed and saved after training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
from flwr.app import ArrayRecord
from torch import nn

from ..adapters import (
    AdapterConfig,
    AdapterStateError,
    Fuse,
    Stack,
    add_adapter,
    add_fusion,
    adapter_configs,
    head_parameter_names,
    set_active_adapter,
)
from ..adapters.state import HEAD_PREFIX, adapter_parameters
from ..adapters.targets import find_insertion_points, num_layers
from ..configuration import ConfigError
from ..training import TrainStats
from .config import RunConfig
from .mods import split_controls
from .private_store import PrivateStore

SHARED, PRIVATE, FUSION = "default", "private", "fusion"
Params = dict[str, nn.Parameter]
State = dict[str, torch.Tensor]
# fit(max_steps=None, prox_mu=0.0, prox_reference=None) trains whatever is trainable on the client's data.
Fit = Callable[..., TrainStats]
Evaluate = Callable[[], dict[str, float]]


def prepare_model(model: nn.Module, config: RunConfig) -> None:
    """Adds the mode's private modules beside the shared adapter and remembers their initial values."""
    p = config.personalization
    if p.mode in ("ditto", "fusion") or (p.mode == "split" and p.private == "stacked"):
        add_adapter(model, private_adapter_config(config), PRIVATE)
    if p.mode == "fusion":
        add_fusion(model, [SHARED, PRIVATE], FUSION, dim=p.fusion_dim)
    if p.mode == "split" and p.private == "top_layers" and p.private_layers >= num_layers(model):
        raise ConfigError(
            f"personalization.private_layers = {p.private_layers} would keep every one of the model's "
            f"{num_layers(model)} layers private and share nothing; choose fewer"
        )
    set_active_adapter(model, SHARED)
    model.initial_private_state = snapshot(private_parameters(model, config))


def private_adapter_config(config: RunConfig) -> AdapterConfig:
    shared = config.adapter.to_adapter_config()
    size = config.personalization.private_bottleneck
    return dataclasses.replace(shared, bottleneck_size=size, reduction_factor=None) if size else shared


def _keeps_head(config: RunConfig) -> bool:
    """Split modes keep a trained head at home; the others send it with the adapter."""
    return config.personalization.mode == "split"


def shared_parameters(model: nn.Module, config: RunConfig) -> Params:
    """What crosses the wire: the shared adapter (minus private top layers), and the head unless it is private."""
    params = adapter_parameters(model, SHARED, include_head=config.adapter.train_head and not _keeps_head(config))
    private_top = _private_top_layer_keys(model, config)
    return {k: v for k, v in params.items() if k not in private_top}


def private_parameters(model: nn.Module, config: RunConfig) -> Params:
    """What a client keeps: keys of the private adapter and fusion are prefixed with their names."""
    p = config.personalization
    if not p.keeps_private_part:
        return {}
    params: Params = {}
    private_top = _private_top_layer_keys(model, config)
    if private_top:
        shared = adapter_parameters(model, SHARED, include_head=False)
        params.update({k: shared[k] for k in private_top})
    if PRIVATE in adapter_configs(model):
        params.update({f"{PRIVATE}/{k}": v for k, v in adapter_parameters(model, PRIVATE, include_head=False).items()})
    if p.mode == "fusion":
        params.update({f"{FUSION}/{k}": v for k, v in adapter_parameters(model, FUSION, include_head=False).items()})
    if config.adapter.train_head:
        named = dict(model.named_parameters())
        params.update({HEAD_PREFIX + n: named[n] for n in head_parameter_names(model)})
    return params


def _private_top_layer_keys(model: nn.Module, config: RunConfig) -> set[str]:
    p = config.personalization
    if not (p.mode == "split" and p.private == "top_layers"):
        return set()
    first_private = num_layers(model) - p.private_layers
    modules = {pt.output_module for pt in find_insertion_points(model, config.adapter.to_adapter_config()) if pt.layer >= first_private}
    return {k for k in adapter_parameters(model, SHARED, include_head=False) if k.rsplit(".", 2)[0] in modules}


def snapshot(params: Params) -> State:
    return {k: v.detach().clone() for k, v in params.items()}


@torch.no_grad()
def assign(params: Params, state: State, what: str) -> None:
    """Copies `state` into `params`; the keys and shapes must match exactly, or nothing is copied."""
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    wrong = [k for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    if missing or unexpected or wrong:
        raise AdapterStateError(
            f"{what} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}); was it made with another model, adapter or personalization config? "
            "Nothing was loaded"
        )
    for key, param in params.items():
        param.copy_(state[key].to(param.device, param.dtype))


class WireFormat(Protocol):
    """What of a model crosses the wire; server and clients of one run must use the same."""

    def pack(self, model: nn.Module) -> ArrayRecord: ...

    def load(self, model: nn.Module, arrays: ArrayRecord) -> None: ...


@dataclasses.dataclass(frozen=True)
class SharedWire:
    """The WireFormat of a run: only `shared_parameters` travel, in both directions."""

    config: RunConfig

    def pack(self, model: nn.Module) -> ArrayRecord:
        return ArrayRecord(snapshot(shared_parameters(model, self.config)))

    def load(self, model: nn.Module, arrays: ArrayRecord) -> None:
        """Loads the adapter (and head) tensors; SCAFFOLD's control variates beside them are not model weights."""
        assign(shared_parameters(model, self.config), split_controls(arrays)[0].to_torch_state_dict(), "the message's adapter")


def _restore_private(model: nn.Module, config: RunConfig, store: PrivateStore, client: int, received: State) -> None:
    """Loads the client's private tensors; on its first call, initial ones (ditto and fusion copy the global)."""
    state = store.load(client)
    if state is None:
        state = dict(model.initial_private_state)
        if config.personalization.mode in ("ditto", "fusion"):
            for key, value in received.items():
                target = key if key.startswith(HEAD_PREFIX) else f"{PRIVATE}/{key}"
                if target in state and state[target].shape == value.shape:
                    state[target] = value.clone()
    assign(private_parameters(model, config), state, f"client {client}'s private state ({store.path(client)})")


def _personal_composition(config: RunConfig):
    p = config.personalization
    if p.mode == "split":
        return Stack(SHARED, PRIVATE) if p.private == "stacked" else SHARED
    return {"ditto": PRIVATE, "fusion": Fuse(SHARED, PRIVATE, fusion=FUSION)}.get(p.mode, SHARED)


def train_client(model: nn.Module, config: RunConfig, arrays: ArrayRecord, store: PrivateStore, client: int,
                 fit: Fit) -> tuple[ArrayRecord, TrainStats]:
    """One round on one client: trains what the mode trains; returns the shared tensors to send back."""
    p, wire = config.personalization, SharedWire(config)
    wire.load(model, arrays)
    head = config.adapter.train_head
    if p.mode == "split":
        _restore_private(model, config, store, client, {})
        trained = [SHARED, PRIVATE] if p.private == "stacked" else [SHARED]
        set_active_adapter(model, _personal_composition(config), train=trained, train_head=head)
        stats = fit()
        store.save(client, snapshot(private_parameters(model, config)))
        return wire.pack(model), stats

    received = snapshot(shared_parameters(model, config))
    set_active_adapter(model, SHARED)
    stats = fit()  # the global adapter's update, exactly as in FedAvg
    outgoing = wire.pack(model)
    if p.mode in ("ditto", "fusion"):
        assign(shared_parameters(model, config), received, "the global adapter")  # fusion mixes the global one
        _restore_private(model, config, store, client, received)
        if p.mode == "ditto":
            set_active_adapter(model, PRIVATE, train_head=head)
            fit(prox_mu=p.ditto_lambda, prox_reference=_ditto_anchor(model, config, received))
        else:
            set_active_adapter(model, _personal_composition(config), train=[PRIVATE, FUSION], train_head=head)
            fit()
        store.save(client, snapshot(private_parameters(model, config)))
        set_active_adapter(model, SHARED)
    return outgoing, stats


def _ditto_anchor(model: nn.Module, config: RunConfig, received: State) -> dict[str, torch.Tensor]:
    """Ditto's proximal anchor: for each private parameter (by full name), the global tensor it mirrors."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(param)]: received[key.removeprefix(f"{PRIVATE}/")]
            for key, param in private_parameters(model, config).items()}


def activate_personal_model(model: nn.Module, config: RunConfig, store: PrivateStore, client: int, fit: Fit) -> None:
    """Turns `model`, holding the global shared tensors, into `client`'s personal model."""
    p = config.personalization
    if not p.keeps_private_part:
        set_active_adapter(model, SHARED)
        if p.mode == "finetune":
            fit(max_steps=p.finetune_steps)
        return
    _restore_private(model, config, store, client, snapshot(shared_parameters(model, config)))
    set_active_adapter(model, _personal_composition(config))


def evaluate_client(model: nn.Module, config: RunConfig, arrays: ArrayRecord, store: PrivateStore, client: int,
                    evaluate: Evaluate, fit: Fit) -> tuple[dict[str, float], dict[str, float]]:
    """(global, personal) metrics on the client's local test split.

    Global is the model the server holds; where the head is private (split), that model's head never
    trained, so its global figure shows what a client would get without its private part.
    """
    p, wire = config.personalization, SharedWire(config)
    wire.load(model, arrays)
    if p.mode == "split":
        assign(private_parameters(model, config), model.initial_private_state, "the initial private state")
    set_active_adapter(model, SHARED)
    global_metrics = evaluate()
    if p.mode == "none":
        return global_metrics, global_metrics
    activate_personal_model(model, config, store, client, fit)
    personal = evaluate()
    if p.mode == "finetune":
        wire.load(model, arrays)  # the fine-tuned copy is thrown away
    set_active_adapter(model, SHARED)
    return global_metrics, personal
