"""Starting Flower's long-running processes and stopping them with everything they spawned.

A SuperLink or SuperNode starts `flower-superexec`, which starts ServerApp / ClientApp processes; some of
them leave the parent's process group. Stopping therefore walks the process tree (from /proc) before
signalling, so nothing survives a teardown, also after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


class ProcessError(RuntimeError):
    """A Flower process failed to start or to become ready."""


def stat_fields(pid: int | str = "self") -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; raises OSError once the process is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    if not fields:
        raise OSError(f"/proc/{pid}/stat is empty")
    return fields


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(stat_fields(entry.name)[1])
            except OSError:
                continue  # exited while we looked
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    tree, found, frontier = _children(), [], [pid]
    while frontier:
        found.extend(frontier)
        frontier = [child for parent in frontier for child in tree.get(parent, [])]
    return found


def alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 15.0, reap: list[subprocess.Popen] | None = None) -> list[int]:
    """Waits up to `grace` s for `pids` (already told to stop) to exit, then SIGKILLs the rest."""
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        for process in reap or []:
            process.poll()  # our own children become zombies until reaped
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


class ProcessGroup:
    """Background processes with their logs; `stop()` ends all of them and their descendants."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], cwd: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        """Until `text` appears in the process's log; fails at once if the process exits first."""
        process = dict(self.started)[name]
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if process.poll() is not None:
                raise ProcessError(f"{name} exited (code {process.returncode}) before it was ready; its log "
                                   f"{self.log_dir / name}.log ends with:\n{self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{name} not ready after {timeout:.0f} s; see {self.log_dir / name}.log")
            time.sleep(0.1)

    def stop(self, grace: float = 15.0) -> list[int]:
        """SIGTERM to every started process tree, SIGKILL to what is left after `grace` s; returns the pids."""
        pids = [pid for _, process in reversed(self.started) for pid in descendants(process.pid)]
        for _, process in self.started:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_pids(pids, grace, reap=[p for _, p in self.started])
        for _, process in self.started:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        return pids
