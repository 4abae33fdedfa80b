"""Running a federation in Flower's Simulation Engine (Ray) from a RunConfig, in this process.

Each virtual client is a Flower SuperNode whose ClientApp runs in a Ray actor with
`simulation.num_cpus` CPUs and `simulation.num_gpus` GPUs (fractions share a GPU: 0.25 puts four
clients on one). With several GPUs Ray places actors on whichever GPU has capacity left, so clients
spread over all of them; `simulation.ray_num_gpus` caps how many Ray may use.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from .client_app import app as adapter_client_app
from .config import RunConfig
from .recording import RoundRecorder
from .results import prepare_run_dir
from .server_app import run_federation
from .personalization import WireFormat
from .task import shards


def backend_config(config: RunConfig) -> dict:
    """Ray resources: per-client actor resources, and what the Ray cluster may use in all."""
    s = config.simulation
    # No dashboard: it costs a process and seconds of start-up, and a simulation never serves it.
    init_args: dict = {"num_cpus": s.ray_num_cpus or os.cpu_count() or 1, "include_dashboard": False}
    if s.ray_num_gpus >= 0:
        init_args["num_gpus"] = s.ray_num_gpus
    return {"client_resources": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}, "init_args": init_args}


def simulate(
    config: RunConfig, overwrite: bool = False, verbose: bool = True, keep_updates: bool = False, flower_logs: bool = False,
    client_app: ClientApp = adapter_client_app, wire: WireFormat | None = None,
) -> RoundRecorder:
    """Runs the federation described by `config`; returns its records (also written to the run directory).

    Flower's own INFO logs repeat what the per-round lines say; they are shown only with `flower_logs`.
    Benchmarks swap `client_app` and `wire` together to run a baseline federation.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if flower_logs else logging.WARNING)
    prepare_run_dir(config, overwrite)  # fail before Ray starts if earlier results are in the way
    num_clients = len(shards(config))
    outcome: list[RoundRecorder] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome.append(run_federation(grid, config, verbose=verbose, overwrite=True, keep_updates=keep_updates,
                                      wire=wire))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=backend_config(config))
    if not outcome:
        raise RuntimeError(f"the simulation ended without results; see the log above (run directory {config.run_dir})")
    return outcome[0]
