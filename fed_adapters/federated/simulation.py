"""Running a federation in Flower's Simulation Engine (Ray) from a RunConfig, in this process.

Each virtual client is a Flower SuperNode whose ClientApp runs in a Ray actor with
`simulation.num_cpus` CPUs and `simulation.num_gpus` GPUs (fractions share a GPU: 0.25 puts four
clients on one). With several GPUs Ray places actors on whichever GPU has capacity left, so clients
spread over all of them; `simulation.ray_num_gpus` caps how many Ray may use.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
import torch
from torch import nn

from ..configuration import ConfigError
from ..data import check_columns, check_labels, resolve_source
from ..training import DeviceError, resolve_device
from . import checkpoints
from .client_app import app as adapter_client_app
from .config import RunConfig
from .personalization import WireFormat
from .recording import RoundRecorder
from .results import check_run_dir
from .secure_aggregation import check_secure_settings
from .server_app import run_federation
from .strategies import make_strategy
from .task import checked_model, shards, test_data, training_data


class SimulationStopped(RuntimeError):
    """Flower's Simulation Runtime ended before the federation did."""


def backend_config(config: RunConfig) -> dict:
    """Ray resources: per-client actor resources, and what the Ray cluster may use in all."""
    s = config.simulation
    # No dashboard: it costs a process and seconds of start-up, and a simulation never serves it.
    init_args: dict = {"num_cpus": ray_cpus(config), "include_dashboard": False}
    if s.ray_num_gpus >= 0:
        init_args["num_gpus"] = s.ray_num_gpus
    return {"client_resources": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}, "init_args": init_args}


def ray_cpus(config: RunConfig) -> int:
    return config.simulation.ray_num_cpus or os.cpu_count() or 1


def check_client_resources(config: RunConfig) -> None:
    """At least one client's actor must fit in the Ray cluster: otherwise Flower stops with "ActorPool is empty"
    only after Ray has started, and its ServerApp thread keeps the process alive (see `_RuntimeWatchedGrid`)."""
    s = config.simulation
    cpus = ray_cpus(config)
    if s.num_cpus > cpus:
        raise ConfigError(f"simulation.num_cpus = {s.num_cpus:g} per client, but Ray has {cpus} CPU(s) "
                          f"({'simulation.ray_num_cpus' if s.ray_num_cpus else 'every core of this machine'}), so no "
                          "client could start; lower simulation.num_cpus (1 runs one client per core)")
    if s.num_gpus == 0:
        return
    # Without ray_num_gpus Ray counts the GPUs CUDA shows (CUDA_VISIBLE_DEVICES); torch sees the same ones, and a
    # GPU torch cannot use would not train the clients anyway.
    gpus, source = ((s.ray_num_gpus, "simulation.ray_num_gpus") if s.ray_num_gpus >= 0 else
                    (torch.cuda.device_count(), "the CUDA GPUs torch sees on this machine"))
    if s.num_gpus > gpus:
        raise ConfigError(f"simulation.num_gpus = {s.num_gpus:g} per client, but Ray has {gpus} GPU(s) ({source}), "
                          "so no client could start; set simulation.num_gpus = 0 to train the clients on CPUs"
                          + (", or at most the GPUs there are" if gpus else ""))


def check_client_device(config: RunConfig) -> None:
    """`train.device` as a Ray actor sees it: only the GPUs Ray gave it (`simulation.num_gpus`), numbered from 0."""
    device, gpus = config.train.device, config.simulation.num_gpus
    kind, _, index = device.partition(":")
    if kind == "cuda" and gpus == 0:
        raise ConfigError(f"train.device = {device!r} but simulation.num_gpus = 0: Ray gives the clients no GPU; set "
                          "simulation.num_gpus (0.25 shares one GPU among 4 clients) or train.device = 'auto'")
    visible = max(1, math.ceil(gpus))  # a fractional share still sees its one GPU
    if kind == "cuda" and index.isdigit() and int(index) >= visible:
        raise ConfigError(f"train.device = {device!r}: each client sees only the {visible} GPU(s) Ray assigns it, "
                          "numbered from cuda:0; use 'cuda' or 'auto' (Ray spreads the clients over the GPUs)")
    try:
        resolve_device(device)  # the server evaluates there too
    except DeviceError as error:
        raise ConfigError(f"train.device: {error}") from None


def preflight(config: RunConfig) -> tuple[int, nn.Module]:
    """Checks data, partitioning and model in this process, so that bad input fails with its own error
    before Ray starts (inside the apps it would only end the run); returns the number of clients and the
    server's model (built here once, handed to the ServerApp)."""
    columns, model = config.data.columns, config.model
    classification = model.task == "classification"
    try:  # results_dir only: the run directory itself is made when the run starts
        config.run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"results_dir {config.results_dir!r} cannot be created ({error.strerror}); set results_dir "
                          "to a folder this user can write") from None
    source = resolve_source(config.data.source, config.data.data_root or None)
    if isinstance(source, Path) and source.is_file():
        raise ConfigError(
            f"data.source {config.data.source!r} is one file: the server would evaluate on the very examples the "
            f"clients train on. Give a folder holding {config.data.train_split}.jsonl and {config.data.test_split}.jsonl "
            "(or .csv / .parquet; data.train_split / data.test_split name them)")
    check_client_device(config)
    check_client_resources(config)
    client_shards = shards(config)
    for dataset in (training_data(config), test_data(config)):
        check_columns(dataset, columns, need_label=classification)
        if classification:
            check_labels(dataset, columns.label, model.num_labels)
    model = checked_model(config)
    if config.privacy.secure_aggregation:
        check_secure_settings(config, [len(shard.train) for shard in client_shards])
    else:  # Flower's strategies check their own arguments when built
        try:
            make_strategy(config, len(client_shards), RoundRecorder(config.strategy.num_rounds, verbose=False))
        except ValueError as error:
            raise ConfigError(f"strategy {config.strategy.name!r} refuses these settings: {error}") from None
    return len(client_shards), model


def check_resumable(config: RunConfig) -> None:
    run_dir = config.run_dir
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"{run_dir} finished all its rounds (metrics.json is there); nothing to resume")
    checkpoint = checkpoints.latest(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint to resume from; start the run again without --resume")
    # A checkpoint of the last round without metrics.json: the run died while finishing (head calibration,
    # client report, final files); resuming runs no round and finishes it.
    if checkpoint.round > config.strategy.num_rounds:
        raise ConfigError(f"{run_dir}: checkpoint round {checkpoint.round} is past the run's "
                          f"{config.strategy.num_rounds} rounds; its config.toml does not belong to these checkpoints")


def simulate(
    config: RunConfig, overwrite: bool = False, verbose: bool = True, keep_updates: bool = False, flower_logs: bool = False,
    client_app: ClientApp = adapter_client_app, wire: WireFormat | None = None, resume: bool = False,
) -> RoundRecorder:
    """Runs the federation described by `config`; returns its records (also written to the run directory).

    Flower's own INFO logs repeat what the per-round lines say; they are shown only with `flower_logs`.
    Benchmarks swap `client_app` and `wire` together to run a baseline federation. `resume` continues
    an interrupted run after its last complete checkpoint.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if flower_logs else logging.WARNING)
    if resume:
        check_resumable(config)
    else:
        check_run_dir(config, overwrite)  # before anything else: earlier results in the way
    num_clients, model = preflight(config)  # bad input fails here, before the run directory is touched and Ray starts
    outcome: list[RoundRecorder] = []
    server_app = ServerApp()
    runtime_stopped = threading.Event()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome.append(run_federation(_RuntimeWatchedGrid(grid, runtime_stopped), config, verbose=verbose,
                                      overwrite=True, keep_updates=keep_updates, wire=wire, resume=resume, model=model))

    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend_config(config))
    except RuntimeError as error:
        cause = error
        while cause.__cause__ is not None:  # Flower wraps the runtime's error twice
            cause = cause.__cause__
        raise SimulationStopped(f"Flower's Simulation Runtime stopped: {type(cause).__name__}: {cause} (run directory "
                                f"{config.run_dir}; a run with checkpoints continues with --resume RUN_DIR)") from error
    finally:
        runtime_stopped.set()  # whatever ended the runtime (an error, Ctrl-C) ends the ServerApp thread too
    if not outcome:
        raise RuntimeError(f"the simulation ended without results; see the log above (run directory {config.run_dir})")
    return outcome[0]


class _RuntimeWatchedGrid:
    """The simulation's Grid, failing at once when Flower's Simulation Runtime has stopped.

    Flower runs the ServerApp in a thread of its own; when the runtime fails (e.g. Ray cannot start an actor), it
    raises in the main thread but never tells that thread, which would wait for replies for `round_timeout`
    (an hour by default) and keep the process from exiting. So the replies are pulled here, watching for that.
    """

    def __init__(self, grid: Grid, stopped: threading.Event) -> None:
        self._grid = grid
        self._stopped = stopped

    def _check(self) -> None:
        if self._stopped.is_set():
            raise SimulationStopped("Flower's Simulation Runtime stopped; the ServerApp stops with it")

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """As Flower's `InMemoryGrid.send_and_receive`: every reply that arrives within `timeout`."""
        self._check()
        waiting = set(self._grid.push_messages(messages))
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            self._check()
            arrived = list(self._grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if waiting:
                time.sleep(self._grid.pull_interval)
        return replies

    def __getattr__(self, name: str):  # run, push_messages, pull_messages, create_message, ...
        return getattr(self._grid, name)
