"""Per-round checkpoints that a run resumes from (`fed-adapters simulate --resume RUN_DIR`).

`checkpoints/round-NNN/` holds what the round ended with: the global adapter as `save_adapter` writes it
(loadable on its own), the exact arrays on the wire (`global.safetensors`), the server strategy's optimizer
state (FedAdam/Yogi/Adagrad moments, FedAvgM momentum; SCAFFOLD's ledger of accepted rounds), the records so
far, the server's RNG states, the DP accountant and, in simulation, a copy of the clients' private states.
Each is written into a hidden temporary directory that is renamed into place only when complete, so a crash
never leaves a half-written checkpoint that looks like a good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from torch import nn

from ..adapters import save_adapter
from ..configuration import ConfigError

STATE = "server_state.json"
GLOBAL = "global.safetensors"
OPTIMIZER = "strategy.safetensors"
CLIENTS = "clients"
OPTIMIZER_STATES = ("m_t", "v_t", "momentum_vector")  # FedOpt's moments, FedAvgM's momentum


@dataclass
class Checkpoint:
    round: int
    path: Path
    arrays: ArrayRecord
    records: list[dict]
    state: dict

    @property
    def private_states(self) -> Path:
        return self.path / CLIENTS


def round_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:03d}"


def _inner(strategy: Strategy) -> Strategy:
    """The optimizing strategy inside wrappers (e.g. differential privacy)."""
    return getattr(strategy, "strategy", strategy)


def _optimizer_arrays(strategy: Strategy) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for attribute in OPTIMIZER_STATES:
        value = getattr(_inner(strategy), attribute, None)
        if isinstance(value, dict):
            found.update({f"{attribute}/{name}": np.ascontiguousarray(a) for name, a in value.items()})
        elif isinstance(value, list):
            found.update({f"{attribute}/{i:05d}": np.ascontiguousarray(a) for i, a in enumerate(value)})
    return found


def _rng_state() -> dict:
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": json.loads(json.dumps(random.getstate())),
            "numpy": [keys.tolist(), int(position), int(has_gauss), float(cached)]}


def write(run_dir: Path, server_round: int, model: nn.Module, arrays: ArrayRecord, records: list[dict],
          strategy: Strategy | None, private_dir: Path | None, wire_keys: dict[str, set[str]], seconds: float) -> Path:
    """The checkpoint of a completed round, renamed into place only once whole; `wire_keys` and `seconds` (the
    run's so far) let a resumed run report what the whole run sent and took."""
    final = round_dir(run_dir, server_round)
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_adapter(model, partial)
    save_file({name: np.ascontiguousarray(value.numpy()) for name, value in arrays.items()}, str(partial / GLOBAL))
    state = {"round": server_round, "records": records, "rng": _rng_state(), "wire_order": list(arrays.keys()),
             "wire_keys": {direction: sorted(keys) for direction, keys in wire_keys.items()}, "seconds": seconds}
    if strategy is not None:
        if optimizer := _optimizer_arrays(strategy):
            save_file(optimizer, str(partial / OPTIMIZER))
        ledger = getattr(strategy, "ledger", None)
        if ledger is not None:
            state["dp_accountant"] = ledger.state_dict()
        accepted = getattr(_inner(strategy), "accepted_rounds", None)  # SCAFFOLD: whose updates counted, when
        if accepted is not None:
            state["scaffold_accepted_rounds"] = {str(client): round_ for client, round_ in accepted.items()}
    if private_dir is not None and private_dir.is_dir():
        shutil.copytree(private_dir, partial / CLIENTS)
    (partial / STATE).write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run (half-written ones are ignored), or None."""
    complete = [p for p in (run_dir / "checkpoints").glob("round-*")
                if p.name.removeprefix("round-").isdigit() and (p / STATE).is_file()]
    if not complete:
        return None
    path = max(complete, key=lambda p: int(p.name.removeprefix("round-")))  # round-1000 comes after round-999
    try:
        state = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / GLOBAL))
        arrays = ArrayRecord({name: Array(tensors[name]) for name in state["wire_order"]})
        return Checkpoint(int(state["round"]), path, arrays, state["records"], state)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); move it away to resume "
                          "from the one before") from None


def restore(checkpoint: Checkpoint, strategy: Strategy | None, private_dir: Path | None) -> None:
    """Puts back the server's RNG states, the strategy's optimizer state and accountant, the private states."""
    rng = checkpoint.state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if strategy is not None:
        if (checkpoint.path / OPTIMIZER).is_file():
            saved = load_file(str(checkpoint.path / OPTIMIZER))
            for attribute in OPTIMIZER_STATES:
                entries = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(attribute + "/")}
                if entries:
                    value = [entries[k] for k in sorted(entries)] if attribute == "momentum_vector" else entries
                    setattr(_inner(strategy), attribute, value)
        if "dp_accountant" in checkpoint.state and getattr(strategy, "ledger", None) is not None:
            strategy.ledger.load_state_dict(checkpoint.state["dp_accountant"])
        if "scaffold_accepted_rounds" in checkpoint.state:
            _inner(strategy).accepted_rounds = {int(c): r for c, r in checkpoint.state["scaffold_accepted_rounds"].items()}
    if private_dir is not None and checkpoint.private_states.is_dir():
        shutil.rmtree(private_dir, ignore_errors=True)
        shutil.copytree(checkpoint.private_states, private_dir)
