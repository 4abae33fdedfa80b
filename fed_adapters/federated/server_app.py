"""The Flower ServerApp: aggregates adapter tensors with a Flower strategy, evaluates, checkpoints, records.

`run_federation(grid, config)` is the whole server side; the module-level `app` wraps it for `flwr run`
(configuration from Flower's flat run config) and `simulation.simulate` wraps it for in-process runs.
"""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import nn

from ..adapters import save_adapter
from ..data import make_loader
from ..training import evaluate, seed_everything
from . import checkpoints, client_report, results
from .mods import ROUND_OFFSET_KEY, RUN_CONFIG_KEY, split_controls
from .config import RunConfig, run_config_from_flat
from .head_calibration import calibrate_head, format_calibration
from .recording import RoundRecorder, global_metrics
from .sampling import wait_for_nodes
from .secure_aggregation import run_secure_rounds
from .strategies import make_strategy
from .partition import format_summary, summarize, write_summary
from .personalization import SharedWire, WireFormat
from .task import build_adapted_model, shards, test_data, tokenized, tokenizer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, run_config_from_flat(dict(context.run_config)))


def run_federation(
    grid: Grid, config: RunConfig, verbose: bool = True, overwrite: bool = False, keep_updates: bool = False,
    wire: WireFormat | None = None, resume: bool = False, model: nn.Module | None = None,
) -> RoundRecorder:
    """Runs `config.strategy.num_rounds` rounds and writes the run directory; returns what was recorded.

    `wire` (default: the run's shared tensors) must match the ClientApp's; only benchmarks change it.
    `resume` continues after the run directory's last complete checkpoint. `model`: the run's freshly
    built model when the caller has one (`simulate` builds it to check the config).
    """
    wire = wire or SharedWire(config)
    seed_everything(config.seed)
    run_dir = results.prepare_run_dir(config, overwrite, resume)
    num_clients = _partition_report(config, run_dir, verbose)

    # A fresh model, not the per-process cache: an earlier run in this process must not leak its weights in.
    model = model if model is not None else build_adapted_model(config)
    test_loader = make_loader(tokenized(config, test_data(config), (-1, "server-test")), tokenizer(config.model.name),
                              config.train.eval_batch_size, task=config.model.task)
    checkpoint = checkpoints.latest(run_dir) if resume else None
    done = checkpoint.round if checkpoint else 0
    recorder = RoundRecorder(config.strategy.num_rounds, verbose=verbose, keep_updates=keep_updates, offset=done)
    # In simulation the server's machine holds the clients' private states: they are checkpointed too.
    private_dir = config.private_state_dir if config.partition.method != "nodes" and config.keeps_client_state else None
    strategy = None if config.privacy.secure_aggregation else make_strategy(config, num_clients, recorder)
    earlier_seconds = 0.0  # what the run took before an interruption
    if checkpoint:
        wire.load(model, checkpoint.arrays)
        recorder.records = checkpoint.records
        recorder.wire_keys = {d: set(keys) for d, keys in checkpoint.state.get("wire_keys", recorder.wire_keys).items()}
        earlier_seconds = float(checkpoint.state.get("seconds", 0.0))
        checkpoints.restore(checkpoint, strategy, private_dir)
        if verbose:
            print(f"resuming {run_dir} after round {done} of {config.strategy.num_rounds}", flush=True)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        wire.load(model, arrays)
        metrics = evaluate(model, test_loader, device=config.train.device, amp=config.train.amp)
        if not (checkpoint and server_round == 0):  # a resumed run's start was recorded before the interruption
            recorder.evaluated(server_round, metrics, seconds=time.perf_counter() - started)
        if server_round > 0:
            checkpoints.write(run_dir, done + server_round, model, arrays, recorder.records, strategy, private_dir,
                              recorder.wire_keys, earlier_seconds + time.perf_counter() - started)
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    # Flower's strategies tell clients the run's round (strategies.py); the SecAgg+ workflow counts from 1.
    offset = done if config.privacy.secure_aggregation else 0
    run_config = ConfigRecord({RUN_CONFIG_KEY: json.dumps(config.to_dict()), ROUND_OFFSET_KEY: offset})
    started = time.perf_counter()
    initial = checkpoint.arrays if checkpoint else wire.pack(model)
    initial_calibration = None
    if config.head_calibration.initial and not checkpoint:  # a resumed run's head was fitted and trained on already
        initial, initial_calibration = _initial_head(grid, config, initial, run_config, num_clients, verbose)
    if config.privacy.secure_aggregation:
        final_arrays = run_secure_rounds(grid, config, initial, run_config, num_clients, recorder, evaluate_global, done)
    else:
        final_arrays = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=config.strategy.num_rounds - done,
            timeout=config.strategy.round_timeout, train_config=run_config, evaluate_config=ConfigRecord(dict(run_config)),
            evaluate_fn=evaluate_global,
        ).arrays or initial  # empty when every round was skipped
    final_arrays = split_controls(final_arrays)[0]  # SCAFFOLD's control variates have done their work: adapter alone
    wire.load(model, final_arrays)
    calibration = None
    if config.head_calibration.method != "none":
        if verbose:
            print(f"head calibration: {config.head_calibration.fraction:.0%} of the clients compute class feature statistics",
                  flush=True)
        calibrated, calibration = calibrate_head(grid, config, final_arrays, run_config, num_clients)
        if calibrated is not None:
            final_arrays = calibrated
            wire.load(model, final_arrays)
            calibration.update(global_metrics(evaluate(model, test_loader, device=config.train.device, amp=config.train.amp)))
    save_adapter(model, run_dir / "adapter")
    if config.partition.local_test_fraction > 0 and config.model.task == "classification":
        final = ConfigRecord({**dict(run_config), "server-round": config.strategy.num_rounds, ROUND_OFFSET_KEY: 0})
        recorder.clients = client_report.evaluate_every_client(grid, final_arrays, final, config.strategy.round_timeout)
        client_report.write_report(run_dir, recorder.clients, f"{config.run_name}: {config.personalization.mode}")
    summary = client_report.summarize(recorder.clients) if recorder.clients else None
    results.write_run(run_dir, config, recorder.records, earlier_seconds + time.perf_counter() - started, num_clients,
                      recorder.wire_keys, summary, calibration, initial_calibration)
    if verbose:
        print(results.format_rounds(recorder.records), flush=True)
        if calibration:
            print(format_calibration(calibration, recorder.records[-1]), flush=True)
        if summary:
            print(client_report.format_summary(summary), flush=True)
        print(f"results in {run_dir}", flush=True)
    return recorder


def _initial_head(grid: Grid, config: RunConfig, arrays: ArrayRecord, run_config: ConfigRecord, num_clients: int,
                  verbose: bool) -> tuple[ArrayRecord, dict]:
    """`arrays` with the head fitted on the initial adapter's features (every client connected first, as round 1
    waits for them), and what that cost; unchanged arrays and the reason when the statistics cannot fit a head."""
    wait_for_nodes(grid, num_clients, config.strategy.node_wait_timeout, "fitting the initial head")
    fitted, record = calibrate_head(grid, config, arrays, run_config, num_clients)
    if fitted is None:
        outcome, fitted = f"skipped: {record['error']}; round 1 starts from the seeded head", arrays
    else:
        outcome = (f"fitted from {record['clients_replied']} of {record['clients_sampled']} clients, "
                   f"{record['examples']:,} examples (round 0 evaluates it)")
    if verbose:
        print(f"initial head ({config.head_calibration.method}): {outcome}", flush=True)
    return fitted, record


def _partition_report(config: RunConfig, run_dir, verbose: bool) -> int:
    """Writes partition.json (and prints it); returns the number of clients the strategy waits for.

    A deployment's data stay on its SuperNodes: the server knows only how many to expect.
    """
    if config.partition.method == "nodes":
        write_summary([], run_dir / "partition.json", "nodes")
        return config.partition.num_clients
    client_shards = shards(config)
    summary = summarize(client_shards, config.data.label)
    write_summary(summary, run_dir / "partition.json", config.partition.method)
    if verbose:
        print(f"partition ({config.partition.method}, {len(client_shards)} clients):\n{format_summary(summary)}", flush=True)
    return len(client_shards)
