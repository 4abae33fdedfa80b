"""Deployment on Flower's Deployment Engine: certificates, and a real SuperLink + SuperNodes on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import pytest
from cryptography import x509

from conftest import tiny_config
from fed_adapters.adapters import adapter_state_keys, load_adapter
from fed_adapters.cli import main as cli
from fed_adapters.configuration import to_toml
from fed_adapters.deploy.certs import CertificateError, create_certificates, superlink_hosts
from fed_adapters.deploy.local import REFUSED, LoopbackFederation, Silo
from fed_adapters.deploy.processes import ProcessError, alive, descendants, stop_pids
from fed_adapters.federated import node_worker
from fed_adapters.federated.mods import client_id
from fed_adapters.deploy.try_local import APP_DIR, deployment_config, write_silo_data
from fed_adapters.federated.task import build_adapted_model
from fed_adapters.modeling import load_model


def test_certs_cover_the_hosts_and_never_overwrite(tmp_path) -> None:
    certs = create_certificates(tmp_path, ["silo-a"], hosts=["superlink.example.org", "10.0.0.5"])
    assert sorted(superlink_hosts(certs)) == ["10.0.0.5", "superlink.example.org"]
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    link = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())
    assert link.issuer == ca.subject
    assert certs.node_public_key("silo-a").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert certs.node_key("silo-a").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert certs.node_key("silo-a").stat().st_mode & 0o077 == 0  # private keys are the owner's alone

    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    create_certificates(tmp_path, ["silo-a", "silo-b"])  # adds silo-b, keeps everything else
    assert all(p.read_bytes() == data for p, data in before.items())
    assert certs.node_key("silo-b").exists()

    with pytest.raises(CertificateError, match=r"does not cover \['other.example.org'\].*move superlink.crt"):
        create_certificates(tmp_path, [], hosts=["other.example.org"])
    with pytest.raises(CertificateError, match="'bad host' is neither a host name nor an IP"):
        create_certificates(tmp_path / "new", ["x"], hosts=["bad host"])
    assert not (tmp_path / "new").exists()  # nothing written for a bad request
    assert cli(["deploy", "certs", str(tmp_path / "cli"), "--nodes", "a/b"]) == 2
    for bad in ("s" * 70 + ".example.org", "bücher.example.org"):
        with pytest.raises(CertificateError, match="is neither a host name nor an IP"):
            create_certificates(tmp_path / "new", ["x"], hosts=[bad])
        assert not (tmp_path / "new").exists()
    long_name = "a" * 60 + "." + "b" * 60 + ".example.org"  # a valid DNS name longer than a common name may be
    assert long_name in superlink_hosts(create_certificates(tmp_path / "long", [], hosts=[long_name]))

    # The silo took its .key away; running the command again (another node added) keeps the registered .pub.
    registered = certs.node_public_key("silo-a").read_bytes()
    certs.node_key("silo-a").unlink()
    create_certificates(tmp_path, ["silo-a", "silo-c"])
    assert certs.node_public_key("silo-a").read_bytes() == registered and not certs.node_key("silo-a").exists()
    # Hosts compare as certificates do: an IPv6 address in any spelling, a name in any case.
    v6 = create_certificates(tmp_path / "v6", [], hosts=["2001:DB8::1", "Link.Example.org"])
    create_certificates(v6.directory, [], hosts=["2001:db8:0::1", "link.example.org"])
    # A SuperLink key whose certificate went missing: named, and the key kept (a new pair is the operator's call).
    key = v6.superlink_key.read_bytes()
    v6.superlink_cert.unlink()
    with pytest.raises(CertificateError, match="superlink.key exists without its certificate superlink.crt; put the"):
        create_certificates(v6.directory, [])
    assert v6.superlink_key.read_bytes() == key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_loopback_deployment_with_tls_and_node_auth(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 2, "fraction_evaluate": 0.0})
    work = tmp_path / "deployment"
    silos = write_silo_data(config, 2, work / "silo-data")
    deployed = deployment_config(config, 2, work)
    run_config = work / "run_config.toml"
    run_config.write_text(to_toml(deployed.to_dict()))

    federation = LoopbackFederation(work, silos, port=_free_port())
    try:
        federation.start()
        # A node whose key was never registered is refused and exits.
        create_certificates(federation.certs.directory, ["intruder"])
        intruder = federation.start_node(Silo("intruder", silos[0].data_path), index=2)
        assert intruder.wait(timeout=120) != 0
        assert REFUSED in federation.processes.log("intruder")
        federation.run(APP_DIR, run_config)
    finally:
        pids = federation.stop()
    assert pids and not [pid for pid in pids if alive(pid)]  # every process of the federation is gone

    run_dir = deployed.run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["clients_replied"] == 2 for r in rounds[1:])
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1, [r["accuracy"] for r in rounds]
    # Each node's long-running worker trained both rounds: between them it aged by more than its training.
    aged = rounds[2]["client_process_age_seconds_min"] - rounds[1]["client_process_age_seconds_min"]
    assert aged > rounds[1]["client_train_seconds_max"] > 0
    # Only adapter and head tensors travelled, both ways (recorded on the messages themselves).
    expected = sorted(adapter_state_keys(build_adapted_model(config)))
    assert metrics["run"]["tensors_down"] == metrics["run"]["tensors_up"] == expected
    load_adapter(load_model(str(tiny_base), num_labels=2), run_dir / "adapter")
    # The silos' data stayed on the nodes: the server's partition report knows only that nodes hold it.
    assert json.loads((run_dir / "partition.json").read_text()) == {"method": "nodes", "clients": []}


@pytest.mark.integration
def test_a_silo_that_leaves_mid_run_is_not_waited_for(tmp_path, tiny_base, keyword_data) -> None:
    """Flower waits for every client before sampling, forever; after the first round fed_adapters samples whoever
    is connected (at least min_train_clients), so the run finishes without the silo that left. A silo that never
    comes ends the run after strategy.node_wait_timeout, with the counts."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 3, "fraction_evaluate": 0.0,
                         "min_train_clients": 2, "round_timeout": 60.0, "node_wait_timeout": 120.0})
    work = tmp_path / "deployment"
    silos = write_silo_data(config, 3, work / "silo-data")
    deployed = deployment_config(config, 3, work)
    run_config = work / "run_config.toml"
    run_config.write_text(to_toml(deployed.to_dict()))
    expecting_four = work / "expecting_four.toml"
    impatient = dataclasses.replace(config, run_name="four", strategy=dataclasses.replace(config.strategy, node_wait_timeout=3.0))
    expecting_four.write_text(to_toml(deployment_config(impatient, 4, work).to_dict()))
    federation = LoopbackFederation(work, silos, port=_free_port(), insecure=True)
    outcome: dict = {}
    try:
        federation.start()
        with pytest.raises(ProcessError, match=r"round 1 \(training\): 3 node\(s\) connected after 3 s, 4 needed "
                                               r".*partition.num_clients before the first round"):
            federation.run(APP_DIR, expecting_four, timeout=300)
        runner = threading.Thread(target=lambda: outcome.update(log=federation.run(APP_DIR, run_config, timeout=300)))
        runner.start()
        first_round = deployed.run_dir / "checkpoints" / "round-001"
        deadline = time.monotonic() + 300
        while not first_round.is_dir() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)  # polling for the round-1 checkpoint, the condition itself
        assert first_round.is_dir(), "round 1 never completed"
        leaving = dict(federation.processes.started)[silos[2].name]
        leaving.terminate()  # the SuperNode signs off from the SuperLink as it stops
        leaving.wait(timeout=60)
        runner.join(timeout=320)
        assert not runner.is_alive() and "log" in outcome, "the run did not finish without the silo that left"
    finally:
        federation.stop()
    rounds = json.loads((deployed.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["clients_sampled"] == rounds[1]["clients_replied"] == 3
    assert rounds[3]["clients_sampled"] == rounds[3]["clients_replied"] == 2  # the third silo was gone


def test_node_worker_survives_a_vanished_client_and_reports_its_own_death(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    node = {"data-path": str(tmp_path / "data.jsonl"), "state-dir": str(tmp_path / "state"), "client-id": "3"}
    files = node_worker.WorkerFiles(node)
    # A pid file left behind naming a process that is no worker: never taken for one (nor stopped as one).
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files.directory.mkdir(parents=True)
        (files.directory / "worker-0.pid").write_text(str(stranger.pid))
        assert node_worker.running_pids(files.directory) == []
    finally:
        stranger.kill()
        stranger.wait()

    # A ClientApp that connects and goes away does not take the worker (and its cached base) down.
    node_worker._start(files, node, idle_seconds=60).close()  # hung up without a request
    pid = int(files.pid.read_text())
    # Its socket is a file in a directory only this user may enter (an abstract socket would take anyone's call).
    socket_file = Path(files.address)
    assert stat.S_ISSOCK(socket_file.stat().st_mode) and socket_file.parent == tmp_path / "run" / f"fed_adapters-{os.getuid()}"
    assert stat.S_IMODE(socket_file.parent.stat().st_mode) == 0o700
    with Client(files.address, family="AF_UNIX", authkey=files.authkey()) as connection:
        connection.send(("no-such-work", {}, {}, node, 0))
        status, payload = connection.recv()
    assert (status, payload) == ("error", "KeyError: 'no-such-work'")
    assert node_worker.running_pids(files.directory) == [pid]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while node_worker.running_pids(files.directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not files.pid.exists() and not socket_file.exists()  # a stopped worker leaves no pid file, no socket

    # A worker that dies while working: the ClientApp says so and where its log is, not a bare EOFError.
    listener = Listener(files.address, family="AF_UNIX", authkey=files.authkey())

    def die_after_reading() -> None:
        with listener.accept() as connection:
            connection.recv()
        listener.close()

    threading.Thread(target=die_after_reading, daemon=True).start()
    with pytest.raises(RuntimeError, match=f"worker stopped while working on this message .*its log {files.log}"):
        node_worker.call("train", {}, {}, node, 0)


def test_the_worker_socket_directory_must_be_private(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    shared = tmp_path / f"fed_adapters-{os.getuid()}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # whatever the umask
    with pytest.raises(RuntimeError, match="must be a directory owned by this user .* with mode 0700, but it is not; remove it"):
        node_worker.private_socket_dir()
    shared.rmdir()
    assert node_worker.private_socket_dir() == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700


def test_a_node_names_its_client_with_a_number() -> None:
    assert client_id({"client-id": "3"}, node_id=99) == 3 and client_id({}, node_id=7) == 7
    with pytest.raises(ValueError, match="client-id='hospital-a' must be a whole number"):
        client_id({"client-id": "hospital-a"}, node_id=7)


def test_a_taken_or_impossible_port_is_named_before_anything_is_written(tmp_path, tiny_base, keyword_data, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tiny_config(tmp_path, tiny_base, keyword_data).to_dict()))
    port = _free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        for chosen, message in ((70000, "--port must lie in 1..65523 (the SuperNodes listen on port + 10 onward), got 70000"),
                                (port, f"port {port} on 127.0.0.1 is taken")):
            assert cli(["deploy", "local", str(config), "--silos", "2", "--port", str(chosen),
                        "--work-dir", str(tmp_path / "work")]) == 2
            assert message in capsys.readouterr().err
            assert not (tmp_path / "work").exists()  # the corrected command finds the work dir as it was


def test_a_model_that_cannot_load_is_named_before_any_process_starts(tmp_path, tiny_base, keyword_data, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tiny_config(tmp_path, tiny_base, keyword_data).to_dict()))
    assert cli(["deploy", "local", str(config), "--silos", "2", "--port", str(_free_port()), "--work-dir",
                str(tmp_path / "work"), "--set", "model.name=/no/such/model"]) == 2
    assert "model '/no/such/model': no such directory" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_a_taken_port_is_named_before_anything_starts(tmp_path) -> None:
    port = _free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        federation = LoopbackFederation(tmp_path, [], port=port, insecure=True)
        with pytest.raises(ProcessError, match=f"port {port} on 127.0.0.1 is taken .* choose another --port"):
            with federation:
                pass
        assert federation.processes.started == []


@pytest.mark.integration
def test_sigterm_to_a_local_deployment_stops_every_process(tmp_path, tiny_base, keyword_data) -> None:
    silos = write_silo_data(tiny_config(tmp_path, tiny_base, keyword_data), 1, tmp_path / "silo-data")
    script = (f"from pathlib import Path\nfrom fed_adapters.deploy.local import LoopbackFederation, Silo\n"
              f"with LoopbackFederation({str(tmp_path / 'work')!r}, [Silo('a', Path({str(silos[0].data_path)!r}))], "
              f"port={_free_port()}, insecure=True):\n    print('up', flush=True)\n    input()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    federation: list[int] = []
    try:
        assert holder.stdout.readline() == "up\n"  # SuperLink and SuperNode are running
        federation = descendants(holder.pid)[1:]
        assert len(federation) >= 2
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
        survivors = [pid for pid in federation if alive(pid)]
    finally:
        holder.kill()
        stop_pids([pid for pid in federation if alive(pid)], grace=0)  # whatever a failure left behind
    assert not survivors
