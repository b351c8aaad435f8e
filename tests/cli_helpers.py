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
    # Tests time their kills by the trials' result.json, which the sweep folder gets with each
    # experiment-state save: every max(10 s, 19 x a save) by default since issue 26; every
    # second here (a user who wants that too sets the same variable).
    env.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
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


def run_in_terminal(args: list[str], cwd: Path, env: dict[str, str],
                    timeout: float = 900) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdin, stdout and stderr (Python's pty, as a
    person at a terminal runs it); returns its exit code and everything the terminal got."""
    import pty
    import select

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env,
                               stdin=follower, stdout=follower, stderr=follower,
                               start_new_session=True)
    os.close(follower)
    received, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break  # ended, and nothing more came within a second
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            received.append(data)
        else:
            kill_tree(process)
            raise TimeoutError(f"the CLI ran past {timeout:.0f} s in a terminal")
        returncode = process.wait(timeout=60)
    finally:
        os.close(leader)
    return returncode, b"".join(received).decode(errors="replace")


def processes() -> dict[int, tuple[int, str, list[str]]]:
    """Every live process as pid -> (parent pid, name, command line), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue  # ended, waiting for its parent to reap it
            name = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue  # it ended while being read
        table[int(entry.name)] = (int(parent), name, cmdline)
    return table


def process_tree(root: int, table: dict[int, tuple[int, str, list[str]]]) -> list[int]:
    """``root`` and every live process below it."""
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        if pid in table:
            found.append(pid)
        frontier.extend(child for child, (parent, _, _) in table.items() if parent == pid)
    return found


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process, everything below it, and its process group."""
    pids = [process.pid, *process_tree(process.pid, processes())]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def trial_rows(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each trial's result rows as Ray Tune wrote them (result.json, one JSON object a line)."""
    rows = {}
    for result in sorted((sweep_dir / "trials").glob("trial_*/result.json")):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        rows[result.parent.name.removeprefix("trial_")] = [json.loads(line) for line in lines]
    return rows


def trial_tensorboard_run(sweep_dir: Path, trial_id: str):
    """A trial's TensorBoard run, reloaded (TensorBoard's EventAccumulator). Runs are named
    for people (``trial03 lr=0.00229``); their HParams session's group ends with the trial id
    (``trial03 9fe9532e``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for folder in sorted(path for path in (sweep_dir / "tensorboard").iterdir() if path.is_dir()):
        run = EventAccumulator(str(folder))
        run.Reload()
        start = run.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        if start is not None and plugin_data_pb2.HParamsPluginData.FromString(
                start).session_start_info.group_name.split()[-1] == trial_id:
            return run
    raise AssertionError(f"no TensorBoard run of trial {trial_id} in {sweep_dir / 'tensorboard'}")


def sweep_study(sweep_dir: Path, name: str):
    """The sweep's Optuna study as Optuna itself reads it from the folder's journal file
    (``optuna.log``); a sweep folder never also holds a SQLite study (``optuna.db``)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep_dir = Path(sweep_dir)
    assert not (sweep_dir / "optuna.db").exists()
    journal = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.log")))
    return optuna.load_study(study_name=name, storage=journal)
