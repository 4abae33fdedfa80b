"""`fed-adapters deploy local`: a simulation config run as a real deployment on this machine.

The config's training data are partitioned as the config says and each part written to its silo's own
file; the run config is the same but for `partition.method = "nodes"` (each SuperNode brings its data),
absolute paths (the ServerApp runs in the SuperLink's directory) and the results directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..configuration import ConfigError, to_toml
from ..data import resolve_source
from ..federated.config import RunConfig
from ..federated.partition import partition
from ..federated.task import checked_model, training_data
from .local import NODE_PORT_OFFSET, LoopbackFederation, Silo, check_port_free

APP_DIR = Path(__file__).resolve().parents[2]  # the repository: its pyproject.toml is the Flower App


def write_silo_data(config: RunConfig, num_silos: int, directory: Path) -> list[Silo]:
    """Each silo's private data file: one partition of the config's training data."""
    section = dataclasses.replace(config.partition, num_clients=num_silos)
    parts = partition(training_data(config), section, config.data.label, config.seed)
    if config.partition.method == "natural" and len(parts) != num_silos:
        raise ConfigError(f"the natural partition by {config.partition.column!r} gives {len(parts)} clients; "
                          f"use --silos {len(parts)}")
    directory.mkdir(parents=True, exist_ok=True)
    silos = []
    for index, part in enumerate(parts):
        path = directory / f"silo-{index + 1}.jsonl"
        part.to_json(str(path))
        silos.append(Silo(f"silo-{index + 1}", path))
    return silos


def deployment_config(config: RunConfig, num_silos: int, work_dir: Path) -> RunConfig:
    source = resolve_source(config.data.source, config.data.data_root or None)
    data = dataclasses.replace(config.data, source=str(Path(source).resolve()) if isinstance(source, Path) else source,
                               data_root="")
    return dataclasses.replace(
        config, data=data, results_dir=str(work_dir.resolve() / "results"),
        partition=dataclasses.replace(config.partition, method="nodes", num_clients=num_silos),
        strategy=dataclasses.replace(config.strategy, min_train_clients=min(config.strategy.min_train_clients, num_silos),
                                     min_evaluate_clients=min(config.strategy.min_evaluate_clients, num_silos)),
    )


def run_local_deployment(config: RunConfig, num_silos: int, work_dir: Path, port: int = 9400, insecure: bool = False,
                         app_dir: Path = APP_DIR) -> Path:
    """Brings the federation up, runs `config` on it, tears it down; returns the run directory."""
    if num_silos < 2:
        raise ConfigError(f"--silos must be >= 2, got {num_silos}")
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"{app_dir} holds no pyproject.toml: give --app the fed_adapters repository (the Flower App)")
    highest = 65535 - NODE_PORT_OFFSET - num_silos  # the SuperNodes listen on port + NODE_PORT_OFFSET onward
    if not 1 <= port <= highest:
        raise ConfigError(f"--port must lie in 1..{highest} (the SuperNodes listen on port + {NODE_PORT_OFFSET} onward), "
                          f"got {port}")
    check_port_free(port)  # before anything is written: a retry on another port finds the work dir as it was
    checked_model(config)  # not in the ServerApp, once the whole federation is up
    work_dir = work_dir.resolve()
    silos = write_silo_data(config, num_silos, work_dir / "silo-data")
    deployed = deployment_config(config, num_silos, work_dir)
    run_config = work_dir / "run_config.toml"
    run_config.write_text(to_toml(deployed.to_dict()))
    with LoopbackFederation(work_dir, silos, port=port, insecure=insecure) as federation:
        print(f"SuperLink on 127.0.0.1:{port} ({'insecure' if insecure else 'TLS, node authentication'}), "
              f"{num_silos} SuperNodes up; logs in {federation.processes.log_dir}", flush=True)
        print(federation.run(app_dir, run_config), flush=True)
    return deployed.run_dir
