"""A SuperNode's long-running worker: the frozen base stays in memory across messages and rounds.

Flower 1.41 starts a fresh ClientApp process for every message, and offers no way to keep one alive, so a
base built in the ClientApp would be rebuilt (imports included) for every message. The ClientApp
process instead hands each message's work to this worker (`multiprocessing.connection` on a Unix socket in
a directory only the node's user can enter, authenticated with a key in the node's state directory that only
that user can read), starting it on first use. A worker serves one state directory and one version of the app (the socket's
name hashes both, so a new run's code gets a new worker) and exits when its SuperNode is gone or after
`worker-idle-seconds` (node config, default 900) without work. Its log is `worker-<tag>.log` in the state
directory.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from ..deploy.processes import alive, stat_fields  # stdlib only: keeps the ClientApp process light

START_TIMEOUT = 600.0  # seconds a new worker may take to import and listen
SUPERNODE = "flower-supernode"
APP_ROOT = Path(__file__).resolve().parents[2]  # the installed Flower App (or the repository)
MODULE = "fed_adapters.federated.node_worker"  # how workers are started, and recognised in /proc


def wanted(node: dict) -> bool:
    """A deployed node (no simulation partition) uses a worker unless its config says persistent-worker=false."""
    return "partition-id" not in node and str(node.get("persistent-worker", "true")).lower() != "false"


def node_state_dir(node: dict) -> str:
    """Where a SuperNode keeps what never leaves it: `state-dir`, default `fed_adapters_state/` beside its data."""
    if node.get("state-dir"):
        return str(Path(str(node["state-dir"])).expanduser().resolve())
    if "data-path" not in node:
        raise ValueError("this SuperNode has no data: start it with --node-config \"data-path=/path/to/data.jsonl\"")
    return str(Path(str(node["data-path"])).expanduser().resolve().parent / "fed_adapters_state")


class WorkerFiles:
    """The socket address, key, pid file, log and lock of a node's worker for this version of the app."""

    def __init__(self, node: dict) -> None:
        self.directory = Path(node_state_dir(node))
        # One worker per node and app version; nodes may share a state directory (e.g. on one test machine).
        identity = f"{APP_ROOT}:{self.directory}:{node.get('data-path')}:{node.get('client-id')}"
        self.tag = tag = hashlib.sha1(identity.encode()).hexdigest()[:16]
        self.pid = self.directory / f"worker-{tag}.pid"
        self.log = self.directory / f"worker-{tag}.log"
        self.key = self.directory / "worker.key"
        self.lock = self.directory / "worker.lock"

    @functools.cached_property
    def address(self) -> str:
        """The worker's socket. Not an abstract one: any local user can connect to those and, by never answering
        the key challenge, hold up the worker. Not in the state directory: a socket path has 108 bytes at most."""
        return str(private_socket_dir() / f"{self.tag}.sock")

    def authkey(self) -> bytes:
        """The node's shared secret; created readable by its owner only."""
        if not self.key.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return self.key.read_bytes()


def private_socket_dir() -> Path:
    """`fed_adapters-<uid>/` in $XDG_RUNTIME_DIR (else the temp directory), made if need be, and refused unless
    it is a real directory that only this user can enter."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"fed_adapters-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{base} holds the node workers' sockets, so it must be a directory owned by this user "
                           f"(uid {os.getuid()}) with mode 0700, but it is not; remove it (it is made afresh) or set "
                           "XDG_RUNTIME_DIR to a private directory")
    return base


def running_pids(state_dir: str | Path) -> list[int]:
    """Pids of the workers whose pid files are in `state_dir` and that still run as node workers (a pid file
    left by a worker that died may name a process the system has since given that pid)."""
    pids = []
    for path in Path(state_dir).glob("worker-*.pid"):
        try:
            pid = int(path.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if alive(pid) and MODULE.encode() in command:
            pids.append(pid)
    return pids


# --- the ClientApp's side --------------------------------------------------------------------------------

def call(kind: str, arrays: dict, message_config: dict, node: dict, node_id: int):
    """Runs `client_work.HANDLERS[kind]` in the node's worker (started if need be) and returns its result."""
    files = WorkerFiles(node)
    idle = float(node.get("worker-idle-seconds", 900))
    with _locked(files):
        connection = _connect(files) or _start(files, node, idle)
    with connection:
        try:
            connection.send((kind, arrays, message_config, node, node_id))
            status, payload = connection.recv()
        except (EOFError, OSError) as error:
            raise RuntimeError(f"the node's worker stopped while working on this message ({type(error).__name__}); "
                               f"its log {files.log} says why") from None
    if status != "ok":
        raise RuntimeError(f"the node's worker failed: {payload} (log: {files.log})")
    return payload


@contextmanager
def _locked(files: WorkerFiles):
    """One ClientApp process at a time decides whether to start a worker."""
    files.directory.mkdir(parents=True, exist_ok=True)
    with files.lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _connect(files: WorkerFiles) -> Connection | None:
    try:
        return Client(files.address, family="AF_UNIX", authkey=files.authkey())
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except AuthenticationError:
        raise RuntimeError(f"the node's worker (pid file {files.pid}) holds another key than {files.key}: the state "
                           "directory was reset while it ran; stop that worker (it also exits by itself once idle "
                           "or once its SuperNode stops)") from None


def _start(files: WorkerFiles, node: dict, idle_seconds: float) -> Connection:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", MODULE, json.dumps(node),
               "--watch-pid", str(_supernode_pid()), "--idle-seconds", str(idle_seconds)]
    with files.log.open("ab") as log:
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while (connection := _connect(files)) is None:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the node's worker did not start (exit code {worker.poll()}); its log {files.log} ends "
                               f"with:\n{files.log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return connection


def _supernode_pid() -> int:
    """The SuperNode this ClientApp process runs under (its parent when there is none, e.g. in tests)."""
    pid = os.getpid()
    while pid > 1:
        try:
            if SUPERNODE in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return pid
            pid = int(stat_fields(pid)[1])
        except (OSError, ValueError):
            break
    return os.getppid()


# --- the worker's side -----------------------------------------------------------------------------------

def serve(node: dict, watch_pid: int, idle_seconds: float) -> None:
    """Answers ClientApp requests until the watched SuperNode is gone or nothing came for `idle_seconds`."""
    from .client_work import HANDLERS  # the heavy imports, once per worker

    files = WorkerFiles(node)
    # A socket file left by a worker that was killed: it is started only when connecting failed (under the lock).
    Path(files.address).unlink(missing_ok=True)
    listener = Listener(files.address, family="AF_UNIX", authkey=files.authkey())
    files.pid.write_text(str(os.getpid()))
    last_work, busy = [time.monotonic()], threading.Lock()

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            idle = not busy.locked() and time.monotonic() - last_work[0] > idle_seconds
            if not alive(watch_pid) or idle:
                print(f"worker {os.getpid()} exits: {'idle' if idle else f'SuperNode {watch_pid} is gone'}", flush=True)
                files.pid.unlink(missing_ok=True)
                Path(files.address).unlink(missing_ok=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: leave no pid file behind (the finally below)
    print(f"worker {os.getpid()} serving {files.directory} for SuperNode {watch_pid}", flush=True)
    try:
        while True:
            try:
                connection = listener.accept()
            except Exception as error:  # a client with the wrong key, or one that hung up: not the worker's end
                print(f"refused a connection: {type(error).__name__}: {error}", flush=True)
                continue
            with busy, connection:
                try:
                    _answer(connection, HANDLERS)
                except (EOFError, OSError) as error:  # the ClientApp went away (killed, timed out): serve the next
                    print(f"lost a ClientApp connection: {type(error).__name__}: {error}", flush=True)
                last_work[0] = time.monotonic()
    finally:
        listener.close()  # removes the socket file
        files.pid.unlink(missing_ok=True)


def _answer(connection: Connection, handlers: dict) -> None:
    kind, arrays, message_config, node, node_id = connection.recv()
    try:
        result = ("ok", handlers[kind](arrays, message_config, node, node_id))
    except Exception as error:  # the ClientApp reports it to the server as this client's failure
        traceback.print_exc()
        result = ("error", f"{type(error).__name__}: {error}")
    connection.send(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fed_adapters node worker (started by the ClientApp)")
    parser.add_argument("node_config", help="the SuperNode's node config, JSON")
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    serve(json.loads(args.node_config), args.watch_pid, args.idle_seconds)


if __name__ == "__main__":
    main()
