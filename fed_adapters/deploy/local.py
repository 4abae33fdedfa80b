"""A complete federation on this machine: one SuperLink, N SuperNodes (silos), TLS and node authentication.

The same processes and flags as a real cross-silo deployment (README "Deploy across silos"), on
loopback ports: for trying fed_adapters out, for tests and for measuring the Deployment Engine's cost.
Every process is stopped on exit from the `with` block, also when something failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .certs import CertificateSet, create_certificates
from ..federated.node_worker import node_state_dir, running_pids
from .processes import ProcessError, ProcessGroup, stop_pids

FEDERATION = "fed-adapters-local"
NODE_PORT_OFFSET = 10  # SuperNode i serves its ClientApp API on the SuperLink's port + this + i
NODE_READY = "SuperNode ID:"  # logged once the SuperLink accepted the node
REFUSED = "Failed to activate SuperNode"  # logged by a node whose key the SuperLink does not know


@dataclass(frozen=True)
class Silo:
    name: str
    data_path: Path  # the node's private data; never leaves the node
    state_dir: Path | None = None  # private adapter state; default beside the data


class LoopbackFederation:
    """`with LoopbackFederation(work_dir, silos) as federation: federation.run(app_dir, run_config_toml)`."""

    def __init__(self, work_dir: str | Path, silos: list[Silo], port: int = 9400, insecure: bool = False,
                 ready_timeout: float = 120.0) -> None:
        if len({s.name for s in silos}) != len(silos):
            raise ValueError(f"silo names must be unique, got {[s.name for s in silos]}")
        self.work_dir = Path(work_dir).resolve()
        self.silos = silos
        self.port = port
        self.insecure = insecure
        self.ready_timeout = ready_timeout
        self.certs = CertificateSet(self.work_dir / "certs")
        self.flwr_home = self.work_dir / "flwr_home"
        bin_dir = str(Path(sys.executable).parent)  # flower-superexec, flwr-serverapp, flwr-clientapp by bare name
        self.env = {
            **os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.processes = ProcessGroup(self.work_dir / "logs", self.env)
        self.node_ids: dict[str, int] = {}

    # --- bring-up ---------------------------------------------------------------------------------------
    def __enter__(self) -> LoopbackFederation:
        self._signals = _stop_on_termination()
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            for signum, handler in self._signals.items():
                signal.signal(signum, handler)

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            create_certificates(self.certs.directory, [s.name for s in self.silos])
        self._write_connection()
        self._start_superlink()
        if not self.insecure:
            for silo in self.silos:
                self.node_ids[silo.name] = self.register(self.certs.node_public_key(silo.name))
        for index, silo in enumerate(self.silos):
            self.start_node(silo, index)
        for silo in self.silos:
            self.processes.wait_for_log(silo.name, NODE_READY, self.ready_timeout)

    def _write_connection(self) -> None:
        """The `flwr` CLI's connection to this SuperLink ($FLWR_HOME/config.toml)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.insecure else f'root-certificates = "{self.certs.ca}"'
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n')

    def _start_superlink(self) -> None:
        check_port_free(self.port)  # else the health check below could answer for another SuperLink
        if self.insecure:
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.superlink_cert),
                        "--ssl-keyfile", str(self.certs.superlink_key), "--enable-supernode-auth"]
        self.processes.start("superlink", ["flower-superlink", *security, "--host", "127.0.0.1", "--port", str(self.port)],
                             cwd=self.work_dir / "superlink")
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        scheme = "http" if self.insecure else "https"
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.certs.ca))
        superlink = dict(self.processes.started)["superlink"]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", context=context, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if superlink.poll() is not None or time.monotonic() > deadline:
                raise ProcessError(f"the SuperLink did not come up on port {self.port}; its log ends with:\n"
                                   f"{self.processes.log('superlink')[-2000:]}")
            time.sleep(0.2)

    def register(self, public_key: Path) -> int:
        """Registers a SuperNode's public key with the SuperLink; returns its node id."""
        answer = self.flwr("supernode", "register", str(public_key), FEDERATION, "--format", "json")
        return int(answer["node-id"])

    def start_node(self, silo: Silo, index: int, private_key: Path | None = None) -> subprocess.Popen:
        # client-id: a stable name, so that seeds (and results) do not depend on the node ids of this bring-up
        config = f'data-path="{silo.data_path.resolve()}" client-id={index}'
        if silo.state_dir is not None:
            config += f' state-dir="{silo.state_dir.resolve()}"'
        if self.insecure:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.certs.ca), "--auth-supernode-private-key",
                        str(private_key or self.certs.node_key(silo.name))]
        return self.processes.start(silo.name, [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", *security, "--node-config", config,
            "--port", str(self.port + NODE_PORT_OFFSET + index), "--max-retries", "3",
        ], cwd=self.work_dir / "nodes" / silo.name)

    # --- running ----------------------------------------------------------------------------------------
    def flwr(self, *arguments: str) -> dict:
        """Runs the `flwr` CLI against this federation and returns its JSON answer."""
        done = subprocess.run(["flwr", *arguments], env=self.env, cwd=self.work_dir, capture_output=True, text=True)
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            raise ProcessError(f"`flwr {' '.join(arguments)}` failed: {(done.stdout + done.stderr).strip()[-2000:]}")
        return answer

    def run(self, app_dir: str | Path, run_config: str | Path, timeout: float = 3600.0) -> str:
        """Runs the Flower App in `app_dir` to its end; returns its streamed log. Fails unless it completed."""
        command = ["flwr", "run", str(Path(app_dir).resolve()), FEDERATION, "--stream", "--run-config", str(Path(run_config).resolve())]
        done = subprocess.run(command, env=self.env, cwd=self.work_dir, capture_output=True, text=True, timeout=timeout)
        log = done.stdout + done.stderr
        (self.work_dir / "logs" / "flwr-run.log").write_text(log)
        started = re.search(r"Successfully started run (\d+)", log)
        if done.returncode != 0 or started is None:
            raise ProcessError(f"`flwr run` failed (code {done.returncode}):\n{log[-3000:]}")
        # `flwr run --stream` exits 0 even when the ServerApp failed: ask the SuperLink.
        status = self.flwr("ls", FEDERATION, "--run-id", started.group(1), "--format", "json")["runs"][0]
        if status["status"] != "finished:completed":
            raise ProcessError(f"run {started.group(1)} ended {status['status']}: {status.get('status-details', '')}\n"
                               f"{log[-3000:]}")
        return log

    def stop(self) -> list[int]:
        """Stops every process; returns their pids (the nodes' workers included)."""
        workers = sorted({pid for silo in self.silos for pid in running_pids(node_state_dir(self.node_config(silo)))})
        stopped = self.processes.stop()
        return stopped + stop_pids(workers)  # a worker exits by itself once its SuperNode is gone

    @staticmethod
    def node_config(silo: Silo) -> dict:
        return {"data-path": str(silo.data_path), **({"state-dir": str(silo.state_dir)} if silo.state_dir else {})}


def _stop_on_termination() -> dict:
    """SIGTERM / SIGHUP end the `with` block like Ctrl-C does, so that every process is stopped (the default
    action would end this process alone and leave the federation running); returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed port in TIME_WAIT is free; a listener is not
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ProcessError(f"port {port} on 127.0.0.1 is taken ({error.strerror}): another SuperLink or program "
                               "listens there; stop it or choose another --port") from None
