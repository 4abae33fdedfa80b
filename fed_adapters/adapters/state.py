"""An adapter's tensors as a state dict, as NumPy arrays (Flower's wire format) and as files.

Key order is part of the format, because `to_ndarrays` sends bare arrays: adapter tensors in module
order (each `down.weight, down.bias, up.weight, up.bias`, keyed by the hooked module's name), then the
task head's parameters (`head.<parameter name>`) when the adapter trains its head. Every loader
validates the whole input before it writes anything, so a rejected load leaves the model unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from .config import AdapterConfig
from .layer import Fuse, Stack, composition_members
from .model import (
    add_adapter,
    add_fusion,
    adapter_configs,
    adapter_layers,
    delete_adapter,
    fusion_configs,
    head_parameter_names,
    set_active_adapter,
)
from .targets import num_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
SAVE_ID = "save_id"  # in both files of one save (the weights' safetensors header and the JSON)
HEAD_PREFIX = "head."

log = logging.getLogger(__name__)


class AdapterStateError(ValueError):
    """Adapter tensors or files do not fit this model; the message says what differs."""


def adapter_parameters(model: nn.Module, name: str, include_head: bool | None) -> "OrderedDict[str, torch.Tensor]":
    """An adapter's (or a fusion's) parameters; the head's follow by default when the adapter trains it."""
    configs, fusions = adapter_configs(model), fusion_configs(model)
    if name not in configs and name not in fusions:
        raise AdapterStateError(f"no adapter named {name!r}; this model has {sorted({**configs, **fusions}) or 'none'}")
    params: OrderedDict[str, torch.Tensor] = OrderedDict()
    for module_name, layer in adapter_layers(model):
        if name in layer:
            for param_name, param in layer[name].named_parameters():
                params[f"{module_name}.{param_name}"] = param
    if (name in configs and configs[name].train_head) if include_head is None else include_head:
        all_params = dict(model.named_parameters())
        for param_name in head_parameter_names(model):
            params[HEAD_PREFIX + param_name] = all_params[param_name]
    return params


def adapter_state_dict(
    model: nn.Module, name: str = "default", include_head: bool | None = None
) -> "OrderedDict[str, torch.Tensor]":
    """Copies of the adapter's (and by default its head's) tensors, in the documented order."""
    return OrderedDict((k, v.detach().clone()) for k, v in adapter_parameters(model, name, include_head).items())


def adapter_state_keys(model: nn.Module, name: str = "default", include_head: bool | None = None) -> list[str]:
    return list(adapter_parameters(model, name, include_head))


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], name: str = "default", include_head: bool | None = None
) -> None:
    """Copies `state_dict` into adapter `name`; keys, shapes and dtypes must match exactly."""
    targets = adapter_parameters(model, name, include_head)
    missing = [k for k in targets if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    for key, param in targets.items():
        if key in state_dict:
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif tuple(value.shape) != tuple(param.shape):
                problems.append(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
            elif value.dtype != param.dtype:
                problems.append(f"{key} has dtype {value.dtype}, the model expects {param.dtype}")
    if problems:
        raise AdapterStateError(
            f"adapter state does not fit adapter {name!r} of this model ({'; '.join(problems)}); "
            "was it made for another base model, adapter config or head? Nothing was loaded"
        )
    for key, param in targets.items():
        param.copy_(state_dict[key])


def to_ndarrays(model: nn.Module, name: str = "default", include_head: bool | None = None) -> list[np.ndarray]:
    """The adapter as a list of NumPy arrays in `adapter_state_keys` order (Flower's parameter format)."""
    return [t.cpu().numpy() for t in adapter_state_dict(model, name, include_head).values()]


def from_ndarrays(
    model: nn.Module, arrays: list[np.ndarray], name: str = "default", include_head: bool | None = None
) -> None:
    """Loads arrays produced by `to_ndarrays` on a model with the same base and adapter config."""
    keys = adapter_state_keys(model, name, include_head)
    if len(arrays) != len(keys):
        raise AdapterStateError(
            f"got {len(arrays)} arrays, adapter {name!r} of this model has {len(keys)} tensors; "
            "they were made for another base model, adapter config or head setting. Nothing was loaded"
        )
    state = {}
    for key, array in zip(keys, arrays):
        if not isinstance(array, np.ndarray):
            raise AdapterStateError(f"{key}: expected a NumPy array, got {type(array).__name__}. Nothing was loaded")
        state[key] = torch.from_numpy(np.ascontiguousarray(array))
    load_adapter_state_dict(model, state, name, include_head)


def base_signature(model: nn.Module) -> dict[str, object]:
    """What an adapter file records about its base, to refuse a load onto a different one."""
    config = model.config
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "hidden_size": int(config.hidden_size),
        "num_layers": num_layers(model),
        "num_labels": int(getattr(config, "num_labels", 0) or 0),
        # How the head reads the encoder (PooledClassifier), so a predictor rebuilds the same model.
        "pooling": getattr(model, "pooling", "model"),
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Writes `adapter_config.json` and `adapter.safetensors` (adapter and head only, never the base).

    The task head is saved whether it trained or not: an adapter trained against a frozen, seeded head
    (`train_head=False`) predicts nonsense under any other head. Files are written to temporary names and
    renamed, so an interrupted save never leaves a torn file.
    """
    if name in fusion_configs(model):
        raise AdapterStateError(f"{name!r} is a fusion, not an adapter; activate Fuse(..., fusion={name!r}) and save it "
                                "with its adapters by save_adapter_set")
    config = adapter_configs(model).get(name)
    state = adapter_state_dict(model, name, include_head=_has_head(model))  # raises for an unknown name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "adapter_name": name,
        "adapter_config": config.to_dict(),
        "includes_head": any(k.startswith(HEAD_PREFIX) for k in state),
        "base_model": base_signature(model),
        "fed_adapters_version": __version__,
    }
    _write_pair(directory, state, metadata)
    return directory


def _has_head(model: nn.Module) -> bool:
    return bool(head_parameter_names(model))


def _model_state(model: nn.Module) -> tuple[object, dict[str, bool]]:
    """What a failed load must put back: the active composition and which parameters train."""
    return getattr(model, "active_adapter", None), {n: p.requires_grad for n, p in model.named_parameters()}


def _restore(model: nn.Module, state: tuple[object, dict[str, bool]]) -> None:
    active, trainable = state
    set_active_adapter(model, active)
    for param_name, param in model.named_parameters():
        param.requires_grad_(trainable[param_name])


def read_adapter_metadata(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterStateError(f"{path} does not exist; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterStateError(f"{config_path} is not valid JSON ({error}); the adapter directory is corrupted") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Loads a saved adapter onto `model` (adding it if absent) and activates it; returns its name.

    Refuses, before touching the model, an adapter saved for a base of another type or shape.
    """
    directory = Path(directory)
    metadata = read_adapter_metadata(directory)
    _check_base(metadata, model, directory)
    if "adapter_set" in metadata:
        return _load_adapter_set(model, directory, metadata)
    name = name or metadata["adapter_name"]
    state = _read_weights(directory, metadata)
    config = AdapterConfig.from_dict(metadata["adapter_config"])
    existing = adapter_configs(model).get(name)
    if existing is not None and existing != config:
        raise AdapterStateError(f"model already has an adapter {name!r} with another config; pass another name")
    before = _model_state(model)
    if existing is None:
        add_adapter(model, config, name)
    try:
        load_adapter_state_dict(model, state, name, include_head=metadata["includes_head"])
    except AdapterStateError:
        if existing is None:
            delete_adapter(model, name)
        _restore(model, before)
        raise
    set_active_adapter(model, name)
    return name


def base_differences(saved: dict, model: nn.Module, includes_head: bool) -> list[str]:
    """How the base an adapter file records (`saved`) differs from `model`'s, in what the adapter (and its head,
    when the file holds one) depends on; empty when it fits."""
    here = base_signature(model)
    differences = [
        f"{key} {saved[key]!r} (adapter) vs {here[key]!r} (model)"
        for key in ("model_type", "hidden_size", "num_layers")
        if saved[key] != here[key]
    ]
    if includes_head and saved["num_labels"] != here["num_labels"]:
        differences.append(f"num_labels {saved['num_labels']} (adapter head) vs {here['num_labels']} (model)")
    if includes_head and saved.get("pooling", here["pooling"]) != here["pooling"]:
        differences.append(f"pooling {saved['pooling']!r} (the head reads that) vs {here['pooling']!r} (model)")
    return differences


def _check_base(metadata: dict, model: nn.Module, directory: Path) -> None:
    saved, here = metadata["base_model"], base_signature(model)
    differences = base_differences(saved, model, metadata["includes_head"])
    if differences:
        raise AdapterStateError(
            f"adapter in {directory} was made for another base ({saved['name_or_path'] or saved['model_type']}): "
            f"{'; '.join(differences)}. Load it onto the base model it was trained with"
        )
    if saved["name_or_path"] and here["name_or_path"] and Path(saved["name_or_path"]).name != Path(here["name_or_path"]).name:
        log.warning("adapter was saved on %s, loading onto %s", saved["name_or_path"], here["name_or_path"])


def _read_weights(directory: Path, metadata: dict) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:  # one read: the header's save id and the tensors
            stamp = (handle.metadata() or {}).get(SAVE_ID)
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise AdapterStateError(f"{path} cannot be read ({error}); the file is corrupted") from None
    if SAVE_ID in metadata and stamp != metadata[SAVE_ID]:  # files written before save ids carry none
        raise AdapterStateError(
            f"{path} and {directory / CONFIG_FILE} come from different saves (a save interrupted between the two "
            "files, or one file copied from another adapter); save the adapter again, or put back both files of one save")
    return state


def read_single_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, base signature, adapter tensors, head tensors) of a directory holding one adapter — a file of
    `save_adapter`, or a set of one — for callers that place it under a name of their own (serving)."""
    directory = Path(directory)
    metadata = read_adapter_metadata(directory)
    state = _read_weights(directory, metadata)
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if "adapter_set" not in metadata:
        config = AdapterConfig.from_dict(metadata["adapter_config"])
        return config, metadata["base_model"], {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, head
    spec = metadata["adapter_set"]
    if spec["kind"] != "single":
        raise AdapterStateError(
            f"{directory} holds a {spec['kind']} of adapters {spec['adapters']}; only single adapters batch across "
            "clients in one pass — load a stacked or fused set with load_adapter and serve it on its own"
        )
    name = spec["adapters"][0]
    prefix = f"{name}/"
    adapter = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return AdapterConfig.from_dict(metadata["adapter_configs"][name]), metadata["base_model"], adapter, head


def save_adapter_set(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes the active composition — a single adapter, a `Stack` or a `Fuse` — with every adapter and
    fusion it uses and the head, as one directory that `load_adapter` restores and activates."""
    active = getattr(model, "active_adapter", None)
    if active is None:
        raise AdapterStateError("no adapter is active; set_active_adapter(model, ...) the composition to save first")
    configs, fusions = adapter_configs(model), fusion_configs(model)
    members = composition_members(active)
    adapters = [n for n in members if n in configs]
    state: dict[str, torch.Tensor] = {}
    for member in members:
        state.update({f"{member}/{k}": v for k, v in adapter_state_dict(model, member, include_head=False).items()})
    includes_head = _has_head(model)  # trained or frozen: the adapters were trained against it (see save_adapter)
    if includes_head:
        named = dict(model.named_parameters())
        state.update({HEAD_PREFIX + n: named[n].detach().clone() for n in head_parameter_names(model)})
    kind = "stack" if isinstance(active, Stack) else "fuse" if isinstance(active, Fuse) else "single"
    metadata = {
        "adapter_set": {"kind": kind, "adapters": adapters, "fusion": active.fusion if isinstance(active, Fuse) else None},
        "adapter_configs": {n: configs[n].to_dict() for n in adapters},
        "fusion_configs": {n: fusions[n] for n in members if n in fusions},
        "includes_head": includes_head,
        "base_model": base_signature(model),
        "fed_adapters_version": __version__,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_pair(directory, state, metadata)
    return directory


def _load_adapter_set(model: nn.Module, directory: Path, metadata: dict) -> str:
    spec = metadata["adapter_set"]
    state = _read_weights(directory, metadata)
    configs = {n: AdapterConfig.from_dict(c) for n, c in metadata["adapter_configs"].items()}
    clashes = [n for n in [*configs, *metadata["fusion_configs"]] if n in adapter_configs(model) or n in fusion_configs(model)]
    if clashes:
        raise AdapterStateError(f"model already has adapter(s) {clashes}; load the set onto a model without them")
    before = _model_state(model)
    for name, config in configs.items():
        add_adapter(model, config, name)
    for name, fusion in metadata["fusion_configs"].items():
        add_fusion(model, fusion["adapters"], name, dim=fusion["dim"], temperature=fusion["temperature"])
    try:
        for member in [*configs, *metadata["fusion_configs"]]:
            prefix = f"{member}/"
            load_adapter_state_dict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                    member, include_head=False)
        if metadata["includes_head"]:
            named = dict(model.named_parameters())
            head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
            expected = {HEAD_PREFIX + n for n in head_parameter_names(model)}
            if set(head) != expected or any(named[k[len(HEAD_PREFIX):]].shape != v.shape for k, v in head.items()):
                raise AdapterStateError(f"the head in {directory} does not fit this model's head {sorted(expected)}")
            with torch.no_grad():
                for k, v in head.items():
                    named[k[len(HEAD_PREFIX):]].copy_(v)
    except AdapterStateError:
        for name in [*metadata["fusion_configs"], *configs]:
            delete_adapter(model, name)
        _restore(model, before)
        raise
    names = spec["adapters"]
    active = (Stack(*names) if spec["kind"] == "stack" else Fuse(*names, fusion=spec["fusion"]) if spec["kind"] == "fuse"
              else names[0])
    set_active_adapter(model, active)
    return str(active)


def _write_pair(directory: Path, state: dict[str, torch.Tensor], metadata: dict) -> None:
    """Both files of an adapter directory, each atomically, stamped with one save id: a save interrupted
    between them (or files mixed from two saves) is then refused on load instead of read as one adapter."""
    save_id = uuid.uuid4().hex
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={SAVE_ID: save_id}))
    text = json.dumps({**metadata, SAVE_ID: save_id}, indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(text))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"
