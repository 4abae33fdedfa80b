"""A client's personal model out of a finished run: the final global adapter plus what the client kept,
written as one adapter set that `load_adapter` (and `fed-adapters predict`) loads onto the base."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import load_adapter, save_adapter_set
from ..configuration import ConfigError
from .client_work import local_fit
from .config import load_run_dir_config
from .personalization import SHARED, activate_personal_model
from .private_store import PrivateStore
from .task import ClientSite, build_adapted_model, tokenizer


def export_client(run_dir: str | Path, client: int, out_dir: str | Path, overwrite: bool = False) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "adapter").is_dir():
        raise ConfigError(f"{run_dir} is not a finished run directory (it needs config.toml and adapter/); "
                          "pass the directory `fed-adapters simulate` printed at the end")
    if out_dir.resolve() == (run_dir / "adapter").resolve():
        raise ConfigError(f"{out_dir} is the run's own final adapter; export the client's adapter set somewhere else")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; choose another OUT_DIR or pass --overwrite")
    config = load_run_dir_config(run_dir)  # a moved run directory reads its own private states, not the old path's
    clients = json.loads((run_dir / "partition.json").read_text())["clients"]
    if not 0 <= client < len(clients):
        raise ConfigError(f"client {client} is not in this run; its clients are 0..{len(clients) - 1}")
    store = PrivateStore(config.private_state_dir)
    if config.personalization.keeps_private_part and not store.holds(client):
        raise ConfigError(f"client {client} has no private state in {store.directory}: it never trained in this run "
                          "(with fraction_train < 1 some clients may not have been sampled)")
    model = build_adapted_model(config)
    load_adapter(model, run_dir / "adapter", name=SHARED)
    # The finetune mode's personal model is re-made exactly as the final report made it: same data, same seed.
    fit = local_fit(model, tokenizer(config.model.name), config, ClientSite(client), config.strategy.num_rounds)
    activate_personal_model(model, config, store, client, fit)
    return save_adapter_set(model, out_dir)

