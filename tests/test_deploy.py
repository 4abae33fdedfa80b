"""Deployment on Flower's Deployment Engine: certificates, and a real SuperLink + SuperNodes on loopback."""

from __future__ import annotations

import json
import socket

import pytest
from cryptography import x509

from conftest import tiny_config
from fed_adapters.adapters import adapter_state_keys, load_adapter
from fed_adapters.cli import main as cli
from fed_adapters.configuration import to_toml
from fed_adapters.deploy.certs import CertificateError, create_certificates, superlink_hosts
from fed_adapters.deploy.local import REFUSED, LoopbackFederation, Silo
from fed_adapters.deploy.processes import alive
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
