"""Run ``python -m sweeper`` as a real process, and stop exactly the processes it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cli_env(ray_tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("RAY_ADDRESS", None)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)  # Ray's session files go here: proof of a start
    return env


def start_cli(args: list[str], cwd: Path, log: Path, ray_tmp: Path | None = None):
    """Start the CLI in its own session so that it and its Ray can be stopped together."""
    stream = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args], cwd=cwd, env=cli_env(ray_tmp),
        stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
    )


def run_cli(args: list[str], cwd: Path, timeout: float = 900,
            ray_tmp: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=cli_env(ray_tmp),
                          capture_output=True, text=True, timeout=timeout)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """All live processes below ``root`` (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process, everything below it, and its process group."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def trial_rows(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each trial's result rows as Ray Tune wrote them (result.json, one JSON object a line)."""
    rows = {}
    for result in sorted((sweep_dir / "trials").glob("trial_*/result.json")):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        rows[result.parent.name.removeprefix("trial_")] = [json.loads(line) for line in lines]
    return rows
