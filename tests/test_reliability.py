"""Faulty clients cost their own contribution, never the run: validation, failures, skipped rounds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers as tf
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from ray import cloudpickle
from safetensors.numpy import load_file

from conftest import tiny_config
from fed_adapters.adapters import AdapterConfig, add_adapter, save_adapter
from fed_adapters.cli import main as cli
from fed_adapters.configuration import from_mapping
from fed_adapters.federated.config import RunConfig
from fed_adapters.deploy.processes import descendants
from fed_adapters.federated.checkpoints import latest
from fed_adapters.modeling import load_model, load_tokenizer
from fed_adapters.federated.client_app import evaluate_adapter, identify, train_adapter
from fed_adapters.federated.mods import CONTROL_PREFIX
from fed_adapters.federated.recording import RoundRecorder
from fed_adapters.federated.sampling import shuffled_participants
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.strategies import make_strategy
from fed_adapters.federated.validation import update_problem

# Ray actors cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

faulty_app = ClientApp()


@faulty_app.train()
def faulty_train(msg: Message, context: Context) -> Message:
    """Clients 0-2 misbehave after training honestly; the others are the real ClientApp."""
    client = int(context.node_config["partition-id"])
    if client == 0:
        raise RuntimeError("client 0 crashed")
    reply = train_adapter(msg, context)
    arrays = reply.content["arrays"]
    if client == 1:  # NaN in one tensor
        name = next(iter(arrays))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    elif client == 2:  # a tensor of the wrong shape
        name = next(iter(arrays))
        arrays[name] = Array(np.zeros((3, 3), dtype=np.float32))
    return reply


faulty_app.evaluate()(evaluate_adapter)


def test_bad_updates_are_rejected_and_the_round_aggregates_the_rest(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 2, "min_train_clients": 2})
    recorder = simulate(config, keep_updates=True, verbose=False, client_app=faulty_app)
    for record in recorder.records[1:]:
        assert (record["clients_sampled"], record["clients_replied"], record["clients_failed"], record["updates_rejected"]) \
            == (5, 2, 1, 2)
    # The global adapter is the example-weighted mean of the two sound updates only.
    sound = recorder.updates[2]
    total = sum(n for n, _ in sound)
    final = load_file(str(config.run_dir / "adapter" / "adapter.safetensors"))
    for key in final:
        np.testing.assert_allclose(final[key], sum(n * a[key].astype(np.float64) for n, a in sound) / total, atol=1e-6)
    assert recorder.records[-1]["accuracy"] > recorder.records[0]["accuracy"]


hanging_app = ClientApp()


@hanging_app.train()
def hanging_train(msg: Message, context: Context) -> Message:
    """Client 0 hangs (as a stuck node would) beyond the round's timeout; the others are the real ClientApp."""
    if int(context.node_config["partition-id"]) == 0:
        # The fault itself, not synchronisation: the sleep starts after the round began, so it outlasts the
        # test's round_timeout of 20 s by 6 s at least.
        time.sleep(26)
    return train_adapter(msg, context)


def test_a_client_that_times_out_costs_only_its_update(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 1, "round_timeout": 20.0},
                         partition={"local_test_fraction": 0.0})
    recorder = simulate(config, keep_updates=True, verbose=False, client_app=hanging_app)
    record = recorder.records[1]
    assert (record["clients_sampled"], record["clients_replied"], record["clients_failed"]) == (4, 3, 1)
    sound = recorder.updates[1]
    total = sum(n for n, _ in sound)
    final = load_file(str(config.run_dir / "adapter" / "adapter.safetensors"))
    for key in final:
        np.testing.assert_allclose(final[key], sum(n * a[key].astype(np.float64) for n, a in sound) / total, atol=1e-6)


def test_a_round_below_the_minimum_is_skipped_not_fatal(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 2, "min_train_clients": 3})
    records = simulate(config, verbose=False, client_app=faulty_app).records
    assert [r.get("skipped", 0) for r in records[1:]] == [1, 1]
    # Nothing was aggregated: every checkpoint is the initial adapter, and the run finished normally.
    assert records[1]["accuracy"] == records[2]["accuracy"] == records[0]["accuracy"]
    assert (config.run_dir / "metrics.json").is_file() and (config.run_dir / "adapter").is_dir()


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_is_strict_json_when_a_value_does_not_exist(tmp_path, tiny_base, keyword_data) -> None:
    from fed_adapters.federated.results import write_run

    config = tiny_config(tmp_path, tiny_base, keyword_data)
    config.run_dir.mkdir(parents=True)
    records = [{"round": 0, "loss": 0.69, "accuracy": 0.5, "seconds": 0.0},
               {"round": 1, "loss": 0.69, "accuracy": 0.5, "seconds": 1.0, "clients_replied": 0,
                "train_loss": float("nan"), "bytes_up": 0}]  # every client failed: no train loss
    write_run(config.run_dir, config, records, 1.0, num_clients=4)
    rounds = _strict_json((config.run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["train_loss"] is None and rounds[1]["loss"] == 0.69


def _reply(arrays: dict[str, np.ndarray], examples: object = 10) -> Message:
    sent = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))})}), dst_node_id=7,
                   message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": examples})}), reply_to=sent)


def test_update_problems_are_named(message_identity) -> None:
    sent = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    assert update_problem(_reply({"w": np.ones(4, np.float32)}), sent) is None
    assert "update norm 2 exceeds strategy.max_update_norm = 1" in update_problem(_reply({"w": np.ones(4, np.float32)}), sent, 1.0)
    assert "w holds NaN or Inf" in update_problem(_reply({"w": np.array([0, np.inf, 0, 0], np.float32)}), sent)
    assert "w is float64[4], expected float32[4]" in update_problem(_reply({"w": np.zeros(4)}), sent)
    assert "missing ['w'], unexpected ['v']" in update_problem(_reply({"v": np.zeros(4, np.float32)}), sent)
    assert "num-examples is 0" in update_problem(_reply({"w": np.zeros(4, np.float32)}, examples=0), sent)
    # SCAFFOLD's control variates are checked but are not part of the update's length.
    with_control = ArrayRecord({"w": Array(np.zeros(4, np.float32)), CONTROL_PREFIX + "w": Array(np.zeros(4, np.float32))})
    far_control = {"w": np.full(4, 0.1, np.float32), CONTROL_PREFIX + "w": np.full(4, 9.0, np.float32)}
    assert update_problem(_reply(far_control), with_control, 1.0) is None
    assert "holds NaN" in update_problem(_reply({**far_control, CONTROL_PREFIX + "w": np.full(4, np.nan, np.float32)}), with_control)


def test_a_reply_with_odd_metrics_costs_its_update_not_the_round(message_identity) -> None:
    """Flower's FedAvg refuses a round whose replies report different metrics; screening drops the odd one."""
    from fed_adapters.federated.validation import screen

    sent = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    replies = [_reply({"w": np.full(4, float(i), np.float32)}) for i in range(3)]
    for reply in replies:
        reply.content.metric_records["metrics"]["train-loss"] = 0.5
    odd = _reply({"w": np.ones(4, np.float32)})  # no train-loss
    extra = _reply({"w": np.ones(4, np.float32)})
    extra.content.metric_records["more"] = MetricRecord({"x": 1.0})
    kept, rejected = screen(1, [*replies, odd, extra], sent)
    assert kept == replies
    assert [reason for _, reason in rejected] == [
        "its metrics differ from the other replies' (missing ['train-loss'], unexpected [])",
        "the reply holds other records beside 'arrays' and 'metrics'",
    ]
    strategy = make_strategy(from_mapping(RunConfig, {}), 5, RoundRecorder(1, verbose=False))
    strategy.global_arrays = sent
    arrays, _ = strategy.aggregate_train(1, [*replies, odd])  # aggregates the three; no exception
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones(4))


class TenNodes:
    """The one thing a strategy asks of the Grid when it samples everybody."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_shrug_off_two_boosted_attackers(name, message_identity, tmp_path, tiny_base, keyword_data) -> None:
    """8 honest updates around +1, 2 attackers sending -10 x theirs (bench_robust's `scaled` attack)."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 10},
                         strategy={"name": name, "krum_malicious": 2})
    strategy = make_strategy(config, 10, RoundRecorder(1, verbose=False))
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(50, np.float32))}), ConfigRecord(), TenNodes()))
    rng = np.random.default_rng(0)
    honest = [(1.0 + 0.1 * rng.standard_normal(50)).astype(np.float32) for _ in range(8)]
    updates = [-10.0 * u for u in honest[:2]] + honest
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(u)}), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=m) for m, u in zip(sent, updates)]
    aggregate = strategy.aggregate_train(1, replies)[0]["w"].numpy()
    if name == "fedavg":
        assert aggregate.mean() < -1.0  # dragged past zero: the attack works on a plain mean
    elif name == "krum":
        assert any(np.array_equal(aggregate, u) for u in honest)  # one honest update, picked whole
    elif name == "multikrum":
        np.testing.assert_allclose(aggregate, np.mean(honest, axis=0), atol=1e-6)  # all 8 honest ones, no attacker
    else:
        assert np.abs(aggregate - 1.0).max() < 0.3


def _write_rows(directory, rows) -> None:
    directory.mkdir()
    for split in ("train", "validation"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A model type without an adapter mapping (OPT)."""
    directory = tmp_path_factory.mktemp("tiny-opt")
    tokenizer = load_tokenizer()
    tf.OPTModel(tf.OPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", ["column", "labels", "empty_shards", "no_adapter_points", "one_file", "device", "no_model",
                                  "resources", "results_dir", "max_length"])
def test_bad_input_is_one_line_and_leaves_earlier_results(case, tmp_path, tiny_base, keyword_data, tiny_opt, capsys) -> None:
    config_path = tmp_path / "run.toml"
    config_path.write_text(tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 1}).to_toml())
    run_dir = tmp_path / "results" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("earlier results")
    (run_dir / "config.toml").write_text("earlier config")
    overrides, expected = {
        "column": (["data.text=sentence"], "column(s) ['sentence'] not in the data set; it has ['text', 'label', 'client_id']"),
        "labels": (["model.num_labels=2"], "labels [5] in column 'label' are outside [0, 2); set num_labels"),
        "empty_shards": (["partition.num_clients=1000"], "partition.num_clients = 1000 is more clients than the 400 training examples"),
        "no_adapter_points": ([f"model.name={tiny_opt}"], "no adapter mapping for model_type 'opt'"),
        "one_file": ([f"data.source={keyword_data / 'train.jsonl'}"],
                     "is one file: the server would evaluate on the very examples the clients train on"),
        "device": (["train.device=warp-drive"], "train.device: unknown device 'warp-drive'"),
        "no_model": (["model.name=/no/such/model"], "model '/no/such/model': no such directory"),
        "resources": (["simulation.num_gpus=0.5", "simulation.ray_num_gpus=0"],
                      "simulation.num_gpus = 0.5 per client, but Ray has 0 GPU(s)"),
        "results_dir": (["results_dir=/proc/fed_adapters_results"],  # procfs takes no new directories
                        "results_dir '/proc/fed_adapters_results' cannot be created (No such file or directory)"),
        "max_length": (["model.max_length=4096"], "model.max_length = 4096 exceeds the "),
    }[case]
    if case == "labels":
        bad = tmp_path / "bad-labels"
        _write_rows(bad, [{"text": "a b c", "label": i % 2} for i in range(20)] + [{"text": "d e", "label": 5}])
        overrides.append(f"data.source={bad}")
    argv = ["simulate", str(config_path), "--overwrite"] + [a for o in overrides for a in ("--set", o)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fed-adapters: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    # --overwrite allowed replacing them, yet a run that never started left them as they were.
    assert (run_dir / "metrics.json").read_text() == "earlier results"
    assert (run_dir / "config.toml").read_text() == "earlier config"
    with pytest.raises(Exception, match=re.escape(expected[:30])):  # --debug: the full traceback instead
        cli(["--debug"] + argv)


def test_dry_run_checks_what_a_run_would_and_runs_nothing(tmp_path, tiny_base, keyword_data, capsys) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data)
    config_path = tmp_path / "run.toml"
    config_path.write_text(config.to_toml())
    assert cli(["simulate", str(config_path), "--dry-run"]) == 0
    assert f"{config_path}: valid — 4 clients, {config.model.name}, " in capsys.readouterr().out
    assert not config.run_dir.exists()
    assert cli(["simulate", str(config_path), "--dry-run", "--set", "partition.num_clients=1000"]) == 2
    assert "partition.num_clients = 1000 is more clients than the 400 training examples" in capsys.readouterr().err


def test_corrupted_adapter_file_is_one_line(tmp_path, tiny_base, capsys) -> None:
    adapter = tmp_path / "adapter"
    model = load_model(str(tiny_base), num_labels=2)
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=4))
    save_adapter(model, adapter)
    (adapter / "adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a b"}\n')
    assert cli(["predict", str(adapter), "--input", str(data), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fed-adapters: error: ")]
    assert len(errors) == 1 and "adapter.safetensors cannot be read" in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_base, keyword_data, capsys) -> None:
    sections = dict(strategy={"num_rounds": 4, "name": "fedadam", "fraction_train": 0.5, "min_train_clients": 2},
                    partition={"num_clients": 4})
    reference = tiny_config(tmp_path, tiny_base, keyword_data, run_name="uninterrupted", **sections)
    simulate(reference, verbose=False)

    crashing = tiny_config(tmp_path, tiny_base, keyword_data, run_name="crashed", **sections)
    config_path = tmp_path / "crashed.toml"
    config_path.write_text(crashing.to_toml())
    run_dir = crashing.run_dir
    with (tmp_path / "crashed.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "fed_adapters.cli", "simulate", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round-002" / "server_state.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "crashed.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        victims = descendants(process.pid)  # the simulation and its Ray processes, all killed at once
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / "metrics.json").exists()
    # A checkpoint caught half-written is never taken for a complete one.
    (run_dir / "checkpoints" / ".round-009.partial").mkdir()
    assert latest(run_dir).round in (2, 3)
    # Starting the config again would lose the interrupted run: refused, with the way to continue it.
    assert cli(["simulate", str(config_path)]) == 2
    assert f"already holds an interrupted run (checkpoints); continue it with `fed-adapters simulate --resume {run_dir}`" \
        in capsys.readouterr().err

    assert cli(["simulate", "--resume", str(run_dir)]) == 0
    ours = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    theirs = json.loads((reference.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [0, 1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    final, expected = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (run_dir, reference.run_dir))
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], rtol=0, atol=1e-5, err_msg=key)
    assert cli(["simulate", "--resume", str(run_dir)]) == 2  # finished: nothing to resume

    # Killed after the last round's checkpoint, before the final files: --resume finishes it, training nothing.
    csv_before, adapter_before = (run_dir / "metrics.csv").read_bytes(), load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    for name in ("metrics.json", "metrics.csv", "accuracy.png"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "adapter")
    assert cli(["simulate", "--resume", str(run_dir)]) == 0
    finished = json.loads((run_dir / "metrics.json").read_text())
    assert finished["rounds"] == json.loads(json.dumps(ours))
    assert (run_dir / "metrics.csv").read_bytes() == csv_before
    after = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert after.keys() == adapter_before.keys() and all(np.array_equal(after[k], adapter_before[k]) for k in after)
    # The whole run's tensors and time, not only the part that ran after the resume.
    reference_run = json.loads((reference.run_dir / "metrics.json").read_text())["run"]
    assert finished["run"]["tensors_down"] == reference_run["tensors_down"] != []
    assert finished["run"]["tensors_up"] == reference_run["tensors_up"]
    assert finished["run"]["seconds"] >= latest(run_dir).state["seconds"] > 0


def test_sigint_mid_run_ends_the_process_and_the_run_resumes(tmp_path, tiny_base, keyword_data) -> None:
    """SIGINT to the simulation's own process (`kill -INT`, a scheduler; a terminal's Ctrl-C also reaches Ray's
    workers): it exits with 130 and says how to go on, instead of waiting forever on a Flower runtime thread
    blocked on an actor that died with it; `--resume` then finishes the run."""
    # Long local training, so that the interrupt lands while the clients train (a reply in flight).
    config = tiny_config(tmp_path, tiny_base, keyword_data, run_name="interrupted", strategy={"num_rounds": 3},
                         train={"local_epochs": 40})
    config_path = tmp_path / "interrupted.toml"
    config_path.write_text(config.to_toml())
    run_dir, log_path = config.run_dir, tmp_path / "interrupted.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "fed_adapters.cli", "simulate", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    victims: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round-001" / "server_state.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        victims = descendants(process.pid)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, log_path.read_text()[-3000:]
    finally:
        for pid in [process.pid, *victims]:  # whatever the interrupt left behind, should the test fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    done = latest(run_dir).round
    assert 1 <= done < 3 and not (run_dir / "metrics.json").exists()
    assert (f"fed-adapters: interrupted; {run_dir} keeps the checkpoint of round {done}: continue with "
            f"`fed-adapters simulate --resume {run_dir}`") in log_path.read_text()
    assert cli(["simulate", "--resume", str(run_dir)]) == 0
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]] == [0, 1, 2, 3]


def test_overwrite_removes_everything_the_earlier_run_left(tmp_path, tiny_base, keyword_data) -> None:
    """A fresh start under --overwrite keeps no checkpoint, private state or metric of the run it replaces."""
    from fed_adapters.federated.results import RESULT_FILES, prepare_run_dir

    config = tiny_config(tmp_path, tiny_base, keyword_data)
    run_dir = config.run_dir

    def leave_an_earlier_run() -> None:
        for name in ("checkpoints/round-003", "clients/optimizer", "adapter"):
            (run_dir / name).mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "metrics.csv", "accuracy.png", "clients.csv", "personalization.png",
                     "clients/client-0.safetensors", "notes.txt"):
            (run_dir / name).write_text("earlier")

    leave_an_earlier_run()
    resumed = prepare_run_dir(config, resume=True)  # going on: everything stays
    assert all((resumed / name).exists() for name in RESULT_FILES)
    prepare_run_dir(config, overwrite=True)
    assert not any((run_dir / name).exists() for name in RESULT_FILES)
    assert (run_dir / "notes.txt").read_text() == "earlier"  # not the run's: left alone
    assert (run_dir / "config.toml").read_text() == config.to_toml()


def test_latest_checkpoint_past_round_999_and_damaged_ones(tmp_path) -> None:
    from safetensors.numpy import save_file

    from fed_adapters.configuration import ConfigError
    from fed_adapters.federated.checkpoints import GLOBAL, STATE, round_dir

    for server_round in (999, 1000, 1001):
        path = round_dir(tmp_path, server_round)
        path.mkdir(parents=True)
        save_file({"w": np.full(2, server_round, dtype=np.float32)}, str(path / GLOBAL))
        (path / STATE).write_text(json.dumps({"round": server_round, "records": [], "wire_order": ["w"]}))
    (round_dir(tmp_path, 1001) / STATE).unlink()  # half-written: not complete
    found = latest(tmp_path)
    assert found.round == 1000 and float(found.arrays["w"].numpy()[0]) == 1000.0
    (round_dir(tmp_path, 1000) / GLOBAL).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="checkpoint .*round-1000 cannot be read .*move it away"):
        latest(tmp_path)
    save_file({"v": np.zeros(2, dtype=np.float32)}, str(round_dir(tmp_path, 1000) / GLOBAL))  # not the tensors it lists
    with pytest.raises(ConfigError, match="checkpoint .*round-1000 cannot be read \\(KeyError"):
        latest(tmp_path)


slow_to_answer_app = ClientApp()
slow_to_answer_app.train()(train_adapter)
slow_to_answer_app.evaluate()(evaluate_adapter)


@slow_to_answer_app.query()
def identify_after_one_failure(msg: Message, context: Context) -> Message:
    """The clients listed in IDENTIFY_FAILING fail the run's first "which client are you" query (no marker yet)."""
    client = int(context.node_config["partition-id"])
    marker = os.path.join(os.environ["IDENTIFY_MARKER_DIR"], f"client-{client}-failed-once")
    if str(client) in os.environ["IDENTIFY_FAILING"].split(",") and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"client {client} cannot answer yet")
    return identify(msg, context)


@pytest.mark.parametrize("failing", ["2", "0,1,2,3,4"])
def test_a_node_that_fails_to_identify_is_asked_again_and_then_trains(tmp_path, tiny_base, keyword_data, monkeypatch,
                                                                      failing: str) -> None:
    """Shuffled passes only choose identified clients: one that fails the first query joins from the next round;
    with fewer identified than min_train_clients, the round draws uniformly instead of waiting forever."""
    monkeypatch.setenv("IDENTIFY_MARKER_DIR", str(tmp_path))  # Ray's processes, started by this run, inherit it
    monkeypatch.setenv("IDENTIFY_FAILING", failing)
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 4, "fraction_train": 0.4, "sampling": "shuffled"}, train={"local_epochs": 1})
    records = simulate(config, verbose=False, client_app=slow_to_answer_app).records[1:]
    later = [sorted(shuffled_participants(5, 2, r, seed=0)) for r in range(2, 5)]
    assert [r.get("train_clients") for r in records[1:]] == later
    if failing == "2":
        others = [0, 1, 3, 4]
        assert records[0]["train_clients"] == sorted(others[i] for i in shuffled_participants(4, 2, 1, seed=0))
        assert any(2 in clients for clients in later)  # the check has power: client 2 is due in rounds 2-4
    else:  # nobody identified in round 1: a uniform draw of 2 (its clients unknown to the server), no hang
        assert "train_clients" not in records[0] and records[0]["clients_replied"] == 2
    assert all((tmp_path / f"client-{c}-failed-once").exists() for c in failing.split(","))
