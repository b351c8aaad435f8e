"""TensorBoard logs for a sweep: per-epoch scalars and HParams data, one run per trial.

Written by the driver from the results Ray Tune already collects, so every
trial's logs land in the one ``<sweep>/tensorboard`` folder wherever the trial
ran, and TensorFlow is not needed in the driver. The HParams experiment (its
parameters and their domains, the objective metric first) is written once at the start;
each trial's parameters are written when it starts, so the HParams table shows running
trials, and its status when it ends, with ``epochs_trained`` and ``stopped_early`` as
metrics so that trials the scheduler stopped can be told apart. Each trial's run is named
for people: its number in the sweep and its sampled values (``trial03 lr=0.00229``); its
HParams session group (the "Trial ID" column of the HParams view) is the number and the Ray
trial id (``trial03 9fe9532e``), as on the console and in summary.json and trials.csv.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from ray.tune import Callback
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from sweeper.metrics import DIVERGED, METRIC_NAMES
from sweeper.progress import short_values, trial_number
from sweeper.space import choice_text

logger = logging.getLogger(__name__)

EXPERIMENT_RUN = "."
# Metrics of a trial as a whole, written when it ends: how far it trained, and 1 when the
# scheduler stopped it before the full budget.
EPOCHS_TRAINED, STOPPED_EARLY = "epochs_trained", "stopped_early"
RUN_NAME_CHARS = 60


def run_name(number: int, params: dict[str, Any]) -> str:
    """A trial's TensorBoard run: ``trial03 lr=0.00229 batch_size=64``, at most 60 characters,
    with no path separator."""
    name = f"trial{number:02d} {short_values(params)}".replace("/", "_").strip()
    return name if len(name) <= RUN_NAME_CHARS else name[:RUN_NAME_CHARS - 1] + "…"


def session_group(number: int, trial_id: str) -> str:
    """A trial's HParams session group, ``trial03 9fe9532e``: sorted by number in the HParams
    table, with the Ray trial id that names its folder (``trials/trial_<id>``)."""
    return f"trial{number:02d} {trial_id}"


def metric_tags(objective: str) -> tuple[str, ...]:
    """The HParams view's metrics: the objective first, then the others, then the trial's."""
    return (objective, *(name for name in METRIC_NAMES if name != objective),
            EPOCHS_TRAINED, STOPPED_EARLY)


def hparam_info(name: str, distribution: BaseDistribution) -> api_pb2.HParamInfo:
    """Describe one searched parameter's domain for the HParams dashboard."""
    info = api_pb2.HParamInfo(name=name)
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        if all(isinstance(c, bool) for c in choices):
            info.type = api_pb2.DATA_TYPE_BOOL
        elif all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_discrete.extend(float(c) for c in choices)
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(choice_text(c) for c in choices)
    elif isinstance(distribution, (FloatDistribution, IntDistribution)):
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value = float(distribution.low)
        info.domain_interval.max_value = float(distribution.high)
        if distribution.log:
            # TensorBoard's HParamInfo has no scale (tensorboard 2.x); its parallel-coordinates
            # view offers a log axis per column, which the description points to.
            info.description = "sampled log-uniformly: use a log axis"
    return info


def hparam_value(value: Any) -> bool | float | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return choice_text(value)  # a list or dict as the domain shows it: JSON


# TensorBoard's own hparams.summary helpers import TensorFlow (seconds and hundreds of MB in the
# driver); these build the same protos from TensorBoard's TF-free metadata module.
def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data),
                      tensor=metadata.NULL_TENSOR)
    return summary


def experiment_summary(infos: list[api_pb2.HParamInfo], metric_tags: tuple[str, ...],
                       description: str) -> Summary:
    experiment = api_pb2.Experiment(
        description=description,
        time_created_secs=time.time(),
        hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags],
    )
    return _hparams_summary(metadata.EXPERIMENT_TAG,
                            plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_start_summary(params: dict[str, Any], group_name: str) -> Summary:
    info = plugin_data_pb2.SessionStartInfo(group_name=group_name, start_time_secs=time.time())
    for name, value in params.items():
        value = hparam_value(value)
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, float):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    return _hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_start_info=info))


def session_end_summary(failed: bool) -> Summary:
    status = api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_end_info=info))


def scalar_summary(values: dict[str, float]) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])


class EventFile:
    """One TensorBoard event file, written synchronously with plain file I/O.

    TensorBoard's own EventFileWriter goes through ``tf.io.gfile`` and so imports TensorFlow
    (seconds and hundreds of MB) into the driver; the record format needs none of it.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}"
        path = folder / name
        for suffix in itertools.count(1):  # a resumed sweep writes a second file beside the first
            if not path.exists():
                break
            path = folder / f"{name}.{suffix}"
        self._records = RecordWriter(path.open("wb"))
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()  # TensorBoard shows a running sweep as it goes

    def close(self) -> None:
        self._records.close()


class SweepEventWriter:
    """Event files under ``logdir``: the experiment at the top, one run folder per trial."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)
        self._writers: dict[str, EventFile] = {}

    def _write(self, run: str, summary: Summary, step: int = 0) -> None:
        if run not in self._writers:
            self._writers[run] = EventFile(self.logdir / run)
        self._writers[run].write(Event(wall_time=time.time(), step=step, summary=summary))

    def write_experiment(self, space: dict[str, BaseDistribution], metric: str) -> None:
        infos = [hparam_info(name, dist) for name, dist in space.items()]
        self._write(EXPERIMENT_RUN, experiment_summary(infos, metric_tags(metric),
                                                       f"Objective: {metric}"))

    def start_trial(self, run: str, params: dict[str, Any], group: str | None = None) -> None:
        self._write(run, session_start_summary(params, group_name=group or run))

    def log_epoch(self, run: str, epoch: int, metrics: dict[str, float]) -> None:
        self._write(run, scalar_summary(metrics), step=epoch)

    def end_trial(self, run: str, failed: bool) -> None:
        self._write(run, session_end_summary(failed))
        self.close_run(run)

    def close_run(self, run: str) -> None:
        writer = self._writers.pop(run, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for run in list(self._writers):
            self.close_run(run)


class TensorBoardCallback(Callback):
    """Ray Tune callback that mirrors every trial's results into TensorBoard event files."""

    def __init__(self, logdir: Path, space: dict[str, BaseDistribution], metric: str,
                 max_epochs: int | None = None) -> None:
        self.logdir = Path(logdir)
        self.space = space
        self.metric = metric
        self.max_epochs = max_epochs  # None: stopped_early is not written
        self._events: SweepEventWriter | None = None
        self._last_epoch: dict[str, int] = {}
        self._runs: dict[str, str] = {}  # trial id -> run name

    # Ray pickles callbacks into the experiment state; event writers hold threads and files.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_events"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A sweep interrupted before issue 25 resumes with trial-id run names and no totals.
        self.__dict__.update({"max_epochs": None, "_runs": {}, **state})

    @property
    def events(self) -> SweepEventWriter:
        if self._events is None:
            self._events = SweepEventWriter(self.logdir)
        return self._events

    def get_state(self) -> dict[str, Any]:
        return {"last_epoch": dict(self._last_epoch), "runs": dict(self._runs)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._last_epoch.update(state.get("last_epoch", {}))
        self._runs.update(state.get("runs", {}))

    def _run(self, trial) -> str:
        return self._runs.get(trial.trial_id, trial.trial_id)

    def setup(self, **info: Any) -> None:
        if not any(self.logdir.glob("events.out.tfevents.*")):
            self.events.write_experiment(self.space, self.metric)
            self.events.close_run(EXPERIMENT_RUN)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self._last_epoch:
            self._runs[trial.trial_id] = run_name(trial_number(trials, trial), trial.config)
            self.events.start_trial(self._run(trial), trial.config,
                                    group=session_group(trial_number(trials, trial),
                                                        trial.trial_id))
            self._last_epoch[trial.trial_id] = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # A retried trial resumes from its checkpoint; never log an epoch twice.
        if epoch <= self._last_epoch.get(trial.trial_id, 0):
            return
        self._last_epoch[trial.trial_id] = epoch
        metrics = {name: float(result[name]) for name in METRIC_NAMES
                   if name in result and math.isfinite(float(result[name]))}
        self.events.log_epoch(self._run(trial), epoch, metrics)

    def _end(self, trial, failed: bool) -> None:
        epochs = self._last_epoch.get(trial.trial_id, 0)
        totals = {EPOCHS_TRAINED: float(epochs)}
        if self.max_epochs is not None:
            totals[STOPPED_EARLY] = float(not failed and epochs < self.max_epochs)
        self.events.log_epoch(self._run(trial), epochs, totals)
        self.events.end_trial(self._run(trial), failed=failed)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=bool((trial.last_result or {}).get(DIVERGED)))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=True)

    def on_experiment_end(self, trials, **info) -> None:
        self.events.close()
