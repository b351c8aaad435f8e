"""TensorBoard's own reader finds one run per trial with its learning curves and HParams data."""

from __future__ import annotations

import re

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from sweeper.metrics import METRIC_NAMES
from sweeper.tensorboard import (
    EPOCHS_TRAINED,
    EXPERIMENT_RUN,
    STOPPED_EARLY,
    SweepEventWriter,
    hparam_info,
    metric_tags,
    run_name,
)

EXPERIMENT_TAG = "_hparams_/experiment"
SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"


def read_logdir(logdir):
    """What `tensorboard --logdir` would load: a reloaded EventMultiplexer."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return multiplexer


def hparams_data(multiplexer) -> dict[str, dict[str, plugin_data_pb2.HParamsPluginData]]:
    """The HParams plugin's content per run and tag, parsed as the plugin parses it."""
    content = multiplexer.PluginRunToTagToContent("hparams")
    return {run: {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
                  for tag, data in tags.items()} for run, tags in content.items()}


def curve(multiplexer, run: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.util import tensor_util

    return [(event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in multiplexer.Tensors(run, tag)]


def start_hparams(data: plugin_data_pb2.HParamsPluginData) -> dict[str, object]:
    hparams = data.session_start_info.hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}


def test_hparam_info_describes_each_domain():
    lr = hparam_info("train.lr", FloatDistribution(1e-4, 1e-1, log=True))
    assert lr.type == api_pb2.DATA_TYPE_FLOAT64
    assert (lr.domain_interval.min_value, lr.domain_interval.max_value) == (1e-4, 1e-1)
    filters = hparam_info("model.filters", IntDistribution(16, 64, step=16))
    assert filters.domain_interval.max_value == 64.0
    batch = hparam_info("train.batch_size", CategoricalDistribution([32, 64]))
    assert [v.number_value for v in batch.domain_discrete.values] == [32.0, 64.0]
    optimizer = hparam_info("train.optimizer", CategoricalDistribution(["adam", "sgd"]))
    assert optimizer.type == api_pb2.DATA_TYPE_STRING
    assert [v.string_value for v in optimizer.domain_discrete.values] == ["adam", "sgd"]


def test_a_running_trial_shows_its_parameters_before_it_ends(tmp_path):
    """The HParams table lists a trial from its first moment, not only once it has ended."""
    events = SweepEventWriter(tmp_path)
    events.write_experiment({"train.lr": FloatDistribution(1e-4, 1e-1, log=True),
                             "train.optimizer": CategoricalDistribution(["adam", "sgd"])},
                            "val_accuracy")
    events.start_trial("abc", {"train.lr": 0.01, "train.optimizer": "sgd"})
    events.log_epoch("abc", 1, {"loss": 1.5, "val_accuracy": 0.4})

    multiplexer = read_logdir(tmp_path)
    data = hparams_data(multiplexer)
    assert set(multiplexer.Runs()) == {EXPERIMENT_RUN, "abc"}
    assert set(data["abc"]) == {SESSION_START_TAG}  # started, not ended
    assert start_hparams(data["abc"][SESSION_START_TAG]) == {"train.lr": 0.01,
                                                             "train.optimizer": "sgd"}
    assert curve(multiplexer, "abc", "val_accuracy") == [(1, pytest.approx(0.4))]

    events.end_trial("abc", failed=True)
    events.close()
    end = hparams_data(read_logdir(tmp_path))["abc"][SESSION_END_TAG].session_end_info
    assert end.status == api_pb2.STATUS_FAILURE


def test_run_names_are_the_trial_number_and_its_short_values():
    assert run_name(3, {"train.lr": 0.0022881136684755237, "train.optimizer": "sgd"}) == (
        "trial03 lr=0.00229 optimizer=sgd")
    long = run_name(12, {f"model.setting_{i}": 0.123456 for i in range(10)})
    assert len(long) == 60 and long.startswith("trial12 setting_0=0.123 ")
    assert "/" not in run_name(1, {"data.path": "a/b"})


@pytest.fixture(scope="module")
def smoke_logs(smoke_sweep):
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    multiplexer = read_logdir(smoke_sweep.sweep_dir / "tensorboard")
    return smoke_sweep.summary, multiplexer, hparams_data(multiplexer)


def runs_by_trial(data) -> dict[str, str]:
    """Trial id (the end of the HParams session group, ``trial03 9fe9532e``) -> run name."""
    return {tags[SESSION_START_TAG].session_start_info.group_name.split()[-1]: run
            for run, tags in data.items() if SESSION_START_TAG in tags}


def trials_and_runs(smoke_logs):
    """Each trial of summary.json with its TensorBoard run."""
    summary, _, data = smoke_logs
    runs = runs_by_trial(data)
    return [(trial, runs[trial["trial_id"]]) for trial in summary["trials"]]


@pytest.mark.slow
def test_one_run_per_trial_plus_the_experiment_named_for_people(smoke_logs):
    summary, multiplexer, data = smoke_logs
    trial_ids = {trial["trial_id"] for trial in summary["trials"]}
    assert len(trial_ids) == summary["num_trials"]
    runs = runs_by_trial(data)
    assert set(runs) == trial_ids
    assert set(multiplexer.Runs()) == set(runs.values()) | {EXPERIMENT_RUN}
    numbers = sorted(int(re.match(r"trial(\d\d) lr=[\d.e-]+$", run).group(1))
                     for run in runs.values())
    assert numbers == list(range(1, summary["num_trials"] + 1))
    # The HParams table's "Trial ID" is the number the console shows, then Ray's id.
    groups = {tags[SESSION_START_TAG].session_start_info.group_name
              for tags in data.values() if SESSION_START_TAG in tags}
    assert groups == {f"trial{t['number']:02d} {t['trial_id']}" for t in summary["trials"]}
    for trial in summary["trials"]:
        assert runs[trial["trial_id"]].startswith(f"trial{trial['number']:02d} ")


@pytest.mark.slow
def test_per_epoch_scalars_match_the_epochs_trained(smoke_logs):
    summary, multiplexer, _ = smoke_logs
    for trial, run in trials_and_runs(smoke_logs):
        epochs = list(range(1, trial["epochs_trained"] + 1))
        for tag in METRIC_NAMES:
            assert [step for step, _ in curve(multiplexer, run, tag)] == epochs, (run, tag)
        last = curve(multiplexer, run, summary["metric"])[-1][1]
        assert last == pytest.approx(trial["last_metric_value"], abs=1e-6)
        assert all(0.0 <= value <= 1.0 for _, value in curve(multiplexer, run, "val_accuracy"))


@pytest.mark.slow
def test_epochs_trained_and_early_stops_are_hparams_metrics(smoke_logs):
    """ASHA-stopped trials are told apart in the HParams view by two metrics of their own."""
    summary, multiplexer, _ = smoke_logs
    for trial, run in trials_and_runs(smoke_logs):
        assert curve(multiplexer, run, EPOCHS_TRAINED) == [
            (trial["epochs_trained"], trial["epochs_trained"])]
        stopped = trial["status"] == "early_stopped"
        assert curve(multiplexer, run, STOPPED_EARLY)[-1][1] == float(stopped), run
    assert any(trial["status"] == "early_stopped" for trial in summary["trials"])


@pytest.mark.slow
def test_hparams_hold_each_trials_sampled_parameters(smoke_logs):
    _, _, data = smoke_logs
    for trial, run in trials_and_runs(smoke_logs):
        tags = data[run]
        assert set(tags) == {SESSION_START_TAG, SESSION_END_TAG}
        hparams = start_hparams(tags[SESSION_START_TAG])
        assert hparams == pytest.approx(trial["config"])
        assert tags[SESSION_END_TAG].session_end_info.status == api_pb2.STATUS_SUCCESS


@pytest.mark.slow
def test_the_experiment_summary_lists_the_search_space_and_metrics(smoke_logs):
    summary, _, data = smoke_logs
    experiment = data[EXPERIMENT_RUN][EXPERIMENT_TAG].experiment
    assert [info.name for info in experiment.hparam_infos] == ["train.lr"]
    lr = experiment.hparam_infos[0].domain_interval
    assert (lr.min_value, lr.max_value) == pytest.approx((1e-4, 3e-2))
    assert [m.name.tag for m in experiment.metric_infos] == list(metric_tags(summary["metric"]))
    assert experiment.metric_infos[0].name.tag == summary["metric"] == "val_accuracy"
    assert set(METRIC_NAMES) | {EPOCHS_TRAINED, STOPPED_EARLY} == {
        m.name.tag for m in experiment.metric_infos}
    assert "log" in experiment.hparam_infos[0].description  # searched log-uniformly
    assert summary["metric"] in experiment.description
