"""Search spaces in Hydra's sweep grammar become Optuna distributions, or a clear ConfigError."""

from __future__ import annotations

import ast

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.config import ConfigError, SweepConfig, apply_params
from sweeper.space import build_search_space, flatten_space, parse_distribution

# Every setting a search may sample, with two values it allows (low > 0, for log forms).
SEARCHABLE = {
    "model.filters": (8, 64), "model.kernel_size": (1, 4), "model.dense_units": (16, 128),
    "model.dropout": (0.1, 0.5), "model.l2": (1e-6, 1e-3), "model.padding": ("valid", "same"),
    "train.batch_size": (16, 128), "train.lr": (1e-4, 1e-1), "train.seed": (1, 8),
    "train.optimizer": ("adam", "sgd"), "train.precision": ("float32", "mixed_bfloat16"),
    "train.jit_compile": ("true", "false"),
    # Issue 24: the knobs that move accuracy.
    "model.blocks": (1, 4), "model.convs_per_block": (1, 3), "model.batch_norm": (True, False),
    "model.pooling": ("flatten", "global_average"), "model.conv_dropout": (0.1, 0.5),
    "train.momentum": (0.3, 0.9), "train.nesterov": (True, False),
    "train.weight_decay": (1e-5, 1e-2), "train.clip_norm": (0.5, 5.0),
    "train.label_smoothing": (0.05, 0.2), "train.schedule": ("constant", "cosine"),
    "train.warmup_epochs": (1, 5), "train.min_lr_ratio": (0.01, 0.5),
    "train.decay_rate": (0.01, 0.5), "train.flip": ("none", "horizontal"),
    "train.translation": (0.05, 0.2), "train.rotation": (0.01, 0.1), "train.zoom": (0.05, 0.2),
    "train.contrast": (0.1, 0.5), "train.erasing": (0.1, 0.5), "train.patience": (1, 5),
}


def searchable_settings() -> set[str]:
    """Every model/train setting the config schema does not mark as fixed for a sweep."""
    from dataclasses import fields

    from sweeper.config import NOT_SEARCHABLE, ModelConfig, TrainConfig

    return {f"{group}.{item.name}" for group, schema in (("model", ModelConfig),
                                                          ("train", TrainConfig))
            for item in fields(schema) if NOT_SEARCHABLE not in item.metadata}


def test_the_table_covers_every_searchable_setting():
    assert set(SEARCHABLE) == searchable_settings()


def hydra_range(expression: str) -> FloatDistribution:
    """The float grid Hydra's own sweeper lists for a range (the oracle for its last value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = list(OverridesParser.create().parse_override(f"k={expression}").sweep_iterator())
    step = values[1] - values[0]
    return FloatDistribution(min(values), round(max(values), 12), step=round(step, 12))


def number_forms(key: str) -> list[tuple[str, object]]:
    """(expression, expected distribution or the words of its refusal) for a number setting:
    every form of Hydra's grammar, with casts and keyword arguments, as Hydra reads it."""
    low, high = SEARCHABLE[key]
    if isinstance(low, int):  # an integer setting: the declared type makes integers
        step = max(1, (high - low) // 3)
        last = low + ((high - low - 1) // step) * step
        return [
            (f"choice({low}, {high})", CategoricalDistribution([low, high])),
            (f"choice({low}.0, {high})", CategoricalDistribution([low, high])),
            (f"range({low}, {high})", IntDistribution(low, high - 1)),
            (f"range(start={low}, stop={high}, step={step})",
             IntDistribution(low, last, step=step)),
            (f"sort(range({low}, {high}, {step}))", IntDistribution(low, last, step=step)),
            (f"interval({low}, {high})", IntDistribution(low, high)),
            (f"interval(start={low}, end={high})", IntDistribution(low, high)),
            (f"int(interval({low}.4, {high}.6))", IntDistribution(low, high)),
            (f"tag(log, interval({low}, {high}))", IntDistribution(low, high, log=True)),
            (f"tag(log, int(interval({low}, {high})))", IntDistribution(low, high, log=True)),
            (f"tag(log, range({low}, {high}))", IntDistribution(low, high - 1, log=True)),
            (f"interval({low}.5, {high})", "integer setting"),
            (f"float(interval({low}, {high}))", "integer setting"),
            (f"range({low}, {high}, 0.5)", "integer setting"),
            (f"choice({low}, {low}.5)", "integer setting"),
            (f"choice({low}, {low}.0)", "repeated"),
        ]
    return [
        (f"choice({low}, {high})", CategoricalDistribution([low, high])),
        (f"interval({low}, {high})", FloatDistribution(low, high)),
        (f"float(interval({low}, {high}))", FloatDistribution(low, high)),
        (f"interval(start={low}, end={high})", FloatDistribution(low, high)),
        (f"tag(log, interval({low}, {high}))", FloatDistribution(low, high, log=True)),
        (f"tag(log, interval(start={low}, end={high}))", FloatDistribution(low, high, log=True)),
        (f"tag(log, float(interval({low}, {high})))", FloatDistribution(low, high, log=True)),
        (f"range({low}, {high}, {low})", hydra_range(f"range({low}, {high}, {low})")),
        (f"tag(log, range({low}, {high}, {low}))", "applies to interval only"),
        (f"choice({low}, adam)", "number setting"),
    ]


# A number setting written with integers still samples floats (issue 19: interval(0, 1) with
# or without float(...) became an integer distribution, and every trial used 0 or 1).
INTEGER_WRITTEN = [
    ("model.l2", "interval(0, 1)", FloatDistribution(0.0, 1.0)),
    ("model.l2", "float(interval(0, 1))", FloatDistribution(0.0, 1.0)),
    ("model.l2", "choice(0, 1)", CategoricalDistribution([0.0, 1.0])),
    ("model.l2", "range(0, 3)", FloatDistribution(0.0, 2.0, step=1.0)),
    ("model.dropout", "choice(0, 0.5)", CategoricalDistribution([0.0, 0.5])),
    ("train.lr", "tag(log, interval(1, 2))", FloatDistribution(1.0, 2.0, log=True)),
    ("train.lr", "float(choice(1, 2))", CategoricalDistribution([1.0, 2.0])),
    # int(...) on a number setting: whole numbers, sampled as the floats the trial gets (issue
    # 41: integers, shown as 1 where the trial got 1.0).
    ("train.lr", "int(choice(1, 2))", CategoricalDistribution([1.0, 2.0])),
    ("model.l2", "int(interval(0.4, 3.6))", FloatDistribution(0.0, 3.0, step=1.0)),
    ("model.l2", "int(range(0, 3))", FloatDistribution(0.0, 2.0, step=1.0)),
    ("train.lr", "tag(log, int(interval(1, 2)))", "no log-uniform float steps; drop int(...)"),
]


def text_forms(key: str) -> list[tuple[str, object]]:
    first, second = SEARCHABLE[key]
    return [
        (f"choice({first}, {second})", CategoricalDistribution([first, second])),
        (f"sort(choice({second}, {first}))", CategoricalDistribution(sorted([first, second]))),
        (f"str(choice({first}, {second}))", CategoricalDistribution([first, second])),
        ("interval(1, 2)", "text setting"),
        ("range(1, 3)", "text setting"),
        ("choice(1, 2)", "includes '1', but must be one of"),
        (f"tag(log, choice({first}, {second}))", "applies to interval and range only"),
    ]


def true_false_forms(key: str) -> list[tuple[str, object]]:
    return [
        ("choice(true, false)", CategoricalDistribution([True, False])),
        ("choice(1, 2)", "true/false setting; 1 is not one"),
        ("interval(0, 1)", "true/false setting; sample it with choice"),
    ]


def forms(key: str) -> list[tuple[str, object]]:
    first = SEARCHABLE[key][0]
    if isinstance(first, bool):
        return true_false_forms(key)
    return text_forms(key) if isinstance(first, str) else number_forms(key)


FORMS_TABLE = [(key, expression, expected)
               for key in SEARCHABLE
               for expression, expected in forms(key)] + INTEGER_WRITTEN


@pytest.mark.parametrize(("key", "expression", "expected"), FORMS_TABLE,
                         ids=[f"{key}={expression}" for key, expression, _ in FORMS_TABLE])
def test_every_form_of_every_searchable_setting(key, expression, expected):
    """The setting's declared type, or an explicit cast, decides the distribution's type."""
    group, _, name = key.partition(".")
    cfg = config_with_space(**{group: {name: expression}})
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as caught:
            build_search_space(cfg)
        assert caught.value.key == f"search.space.{key}"
        assert expected in caught.value.allowed
        assert "\n" not in str(caught.value)
        return
    distribution = build_search_space(cfg)[key]
    assert distribution == expected
    assert type(distribution) is type(expected)
    if isinstance(distribution, CategoricalDistribution):
        assert [type(c) for c in distribution.choices] == [type(c) for c in expected.choices]


CLI_FORMS = [
    # The command line reaches the same parser: casts and keyword arguments survive quoting.
    ("search.space.model.l2=float(interval(0, 1))", "model.l2", FloatDistribution(0.0, 1.0)),
    ("search.space.model.l2=interval(0, 1)", "model.l2", FloatDistribution(0.0, 1.0)),
    ("search.space.model.dense_units=interval(start=32, end=128)", "model.dense_units",
     IntDistribution(32, 128)),
    ("search.space.train.lr=tag(log, interval(start=1e-5, end=1e-2))", "train.lr",
     FloatDistribution(1e-5, 1e-2, log=True)),
    ("search.space.train.batch_size=range(start=32, stop=129, step=32)", "train.batch_size",
     IntDistribution(32, 128, step=32)),
]


@pytest.mark.parametrize(("override", "key", "expected"), CLI_FORMS,
                         ids=[o for o, _, _ in CLI_FORMS])
def test_forms_typed_on_the_command_line(compose, override, key, expected):
    from sweeper.config import to_sweep_config

    space = build_search_space(to_sweep_config(compose("+experiment=smoke", override)))
    assert space[key] == expected
    assert type(space[key]) is type(expected)


@pytest.mark.parametrize("key", ["data.max_train_samples", "data.max_test_samples", "data.name",
                                 "data.path", "train.validation_fraction", "train.epochs",
                                 "model.name"])
def test_settings_fixed_for_the_whole_sweep_cannot_be_searched(key):
    """Issue 19: searching them changed nothing the trials trained (the driver loads and splits
    the data once; ASHA's budget is train.epochs), yet each trial recorded its own value."""
    group, _, name = key.partition(".")
    with pytest.raises(ConfigError) as caught:
        build_search_space(config_with_space(**{group: {name: "choice(100, 3000)"}}))
    assert caught.value.key == f"search.space.{key}"
    assert caught.value.allowed.startswith("cannot be searched: ")
    assert "\n" not in str(caught.value)


BAD_FORMS = [
    ("choice(", "cannot parse"),
    ("interval(1e-4)", "cannot parse"),
    ("choice()", "cannot parse"),
    ("choice(1, 1)", "repeated"),
    ("range(5, 5)", "empty"),
    ("range(5, 1)", "empty"),
    ("range(1, 4, step=-1)", "empty"),
    ("range(1, 4, step=0)", "non-zero step"),
    ("interval(0.5, 0.5)", "low < high"),
    ("interval(0.5, 0.1)", "low < high"),
    ("tag(log, interval(0, 1))", "low > 0"),
    ("tag(log, interval(-1, 1))", "low > 0"),
    ("tag(sqrt, interval(1, 2))", "unknown tag 'sqrt'"),
    ("tag(log, choice(1, 2))", "interval and range only"),
    ("glob(*)", "Glob sweeps are not supported"),
    ("0.001", "fixed value"),
    (0.001, "expression string"),
    (None, "expression string"),
]


@pytest.mark.parametrize(("expression", "why"), BAD_FORMS, ids=[str(e) for e, _ in BAD_FORMS])
def test_bad_forms_name_the_key_and_the_allowed_forms(expression, why):
    with pytest.raises(ConfigError) as caught:
        parse_distribution("train.lr", expression)
    error = caught.value
    assert error.key == "search.space.train.lr"
    assert error.value == expression
    assert why in error.allowed
    assert "tag(log, interval(low, high))" in error.allowed
    assert "\n" not in str(error)


def test_sorted_and_shuffled_ranges_sample_the_same_values():
    """sort(..., reverse=true) and shuffle(...) only reorder Hydra's list; a sampler has none."""
    plain = parse_distribution("model.filters", "range(16, 64, 16)")
    assert parse_distribution("model.filters", "shuffle(range(16, 64, 16))") == plain
    assert parse_distribution("model.filters", "sort(range(16, 64, 16), reverse=true)") == plain


def config_with_space(**space: dict) -> SweepConfig:
    cfg = SweepConfig()
    cfg.search.space = space
    return cfg


def test_a_valid_space_is_parsed_for_every_key():
    cfg = config_with_space(
        train={"lr": "tag(log, interval(1e-4, 1e-2))", "batch_size": "choice(32, 64)"},
        model={"filters": "range(16, 49, 16)", "dropout": "interval(0.0, 0.5)"},
    )
    space = build_search_space(cfg)
    assert space == {
        "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "train.batch_size": CategoricalDistribution([32, 64]),
        "model.filters": IntDistribution(16, 48, step=16),
        "model.dropout": FloatDistribution(0.0, 0.5),
    }


SPACE_MISTAKES = [
    ({}, "search.space", "at least one"),
    ({"train": {"learning_rate": "interval(0.1, 0.2)"}}, "search.space.train.learning_rate",
     "not a setting"),
    ({"search": {"num_trials": "range(1, 5)"}}, "search.space.search.num_trials", "group"),
    ({"lr": "interval(0.1, 0.2)"}, "search.space.lr", "<group>.<setting>"),
    ({"model": {"filters": "interval(16.5, 64.0)"}}, "search.space.model.filters",
     "integer setting"),
    ({"model": {"filters": "choice(16, 32.5)"}}, "search.space.model.filters", "integer setting"),
    ({"train": {"optimizer": "choice(1, 2)"}}, "search.space.train.optimizer", "must be one of"),
    ({"train": {"optimizer": "choice(adam, lbfgs)"}}, "search.space.train.optimizer",
     "includes 'lbfgs'"),
    ({"model": {"dropout": "choice(0.0, 0.5, 1.0)"}}, "search.space.model.dropout",
     "includes 1.0"),
    ({"train": {"lr": "interval(-0.1, 0.1)"}}, "search.space.train.lr", "includes -0.1"),
    ({"model": {"kernel_size": "range(2, 8)"}}, "search.space.model.kernel_size", "includes 7"),
    ({"train": {"lr": "interval(0.1"}}, "search.space.train.lr", "cannot parse"),
]


@pytest.mark.parametrize(("space", "key", "why"), SPACE_MISTAKES,
                         ids=[key for _, key, _ in SPACE_MISTAKES])
def test_spaces_that_do_not_fit_the_config_are_refused(space, key, why):
    with pytest.raises(ConfigError) as caught:
        build_search_space(config_with_space(**space))
    assert caught.value.key == key
    assert why in caught.value.allowed


def test_flatten_space_turns_nesting_into_dotted_keys():
    nested = {"train": {"lr": "a", "batch_size": "b"}, "model": {"filters": "c"}}
    assert flatten_space(nested) == {"train.lr": "a", "train.batch_size": "b",
                                     "model.filters": "c"}
    assert flatten_space({}) == {}


def test_apply_params_fills_a_copy_and_keeps_declared_types():
    cfg = SweepConfig()
    trial = apply_params(cfg, {"train.lr": 1, "model.filters": 48, "train.optimizer": "sgd"})
    assert trial.train.lr == 1.0 and isinstance(trial.train.lr, float)
    assert trial.model.filters == 48
    assert trial.train.optimizer == "sgd"
    # The base config is untouched: every trial starts from the same settings.
    assert (cfg.train.lr, cfg.model.filters, cfg.train.optimizer) == (1e-3, 32, "adam")


def _typed(value):
    """A value with the type of every part spelled out: 1 and 1.0 and True and '1' differ."""
    if isinstance(value, dict):
        return ("dict", {name: _typed(item) for name, item in value.items()})
    if isinstance(value, (list, tuple)):
        return ("list", [_typed(item) for item in value])
    return (type(value).__name__, value)


# (expression, the setting's declared type (None: a user's builder setting without one),
# what each trial must get, with its type). Issue 41: choice([16,32],[32,64]) gave strings.
SAMPLED_VALUES = [
    ("choice([16,32],[32,64])", None, [[16, 32], [32, 64]]),
    ("choice([[1,2],[3]], [4])", None, [[[1, 2], [3]], [4]]),
    ("choice({scale: 2, names: [a, b]}, {scale: 1.5})", None,
     [{"scale": 2, "names": ["a", "b"]}, {"scale": 1.5}]),
    ("choice([1, 2], 3, x, true)", None, [[1, 2], 3, "x", True]),
    ("choice(true, false)", None, [True, False]),
    ("choice(true, false)", bool, [True, False]),
    ("choice(true, false)", str, ["true", "false"]),
    ("choice('1', '2.5')", None, ["1", "2.5"]),
    ("choice(1, 2)", str, ["1", "2"]),
    ("choice('[1, 2]', '{}')", None, ["[1, 2]", "{}"]),
    ("choice(1, 2.5)", None, [1, 2.5]),
    ("choice(0, 1)", float, [0.0, 1.0]),
    ("choice(8, 16)", int, [8, 16]),
    ("choice(1e-3, 0.01)", None, [0.001, 0.01]),
    ("choice(1, 2, 100, 1e5)", float, [1.0, 2.0, 100.0, 100000.0]),
    ("choice(0, 0.5)", float, [0.0, 0.5]),
    ("int(choice(1, 2))", float, [1.0, 2.0]),
]


@pytest.mark.parametrize(("expression", "declared", "expected"), SAMPLED_VALUES,
                         ids=[f"{e}-{getattr(d, '__name__', d)}" for e, d, _ in SAMPLED_VALUES])
def test_every_sampled_value_reaches_the_trial_with_its_type(expression, declared, expected):
    """Through the study (its journal file, reopened), the searcher's decoding, the summary's
    JSON, TensorBoard's column and best_config.yaml's pinned choice, each value keeps the type
    the console shows."""
    import json
    import tempfile

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from sweeper.evaluate import _hydra_literal
    from sweeper.progress import short_values
    from sweeper.space import choice_text, decode_choice, decode_params, encode_choice
    from sweeper.summary import cell
    from sweeper.tensorboard import hparam_value

    distribution = parse_distribution("model.setting", expression, declared)
    assert isinstance(distribution, CategoricalDistribution)
    with tempfile.TemporaryDirectory() as folder:
        storage = JournalStorage(JournalFileBackend(f"{folder}/optuna.log"))
        study = optuna.create_study(storage=storage, study_name="s")
        for index in range(len(expected)):
            study.enqueue_trial({"model.setting": distribution.choices[index]})
            study.ask({"model.setting": distribution})
        reopened = optuna.load_study(study_name="s", storage=JournalStorage(
            JournalFileBackend(f"{folder}/optuna.log")))
        sampled = [trial.params["model.setting"] for trial in reopened.trials]
    got = [decode_params({"model.setting": value})["model.setting"] for value in sampled]
    assert [_typed(value) for value in got] == [_typed(value) for value in expected]
    for value in got:
        assert _typed(json.loads(json.dumps(value))) == _typed(value)  # summary.json
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # The console's trial line and the tables (report.md's too) show a float as one:
            # dropout=0.0, not dropout=0 (issue 41).
            shown_on_console = short_values({"model.setting": value}).partition("=")[2]
            for text in (shown_on_console, cell(value)):
                assert type(ast.literal_eval(text)) is type(value), text
        assert encode_choice(value) in distribution.choices  # warm start, report, defaults
        shown = hparam_value(value)
        if isinstance(shown, str):
            assert shown in [choice_text(choice) for choice in distribution.choices]
        pinned = parse_distribution("model.setting", f"choice({_hydra_literal(value)})",
                                    declared)
        assert [_typed(decode_choice(c)) for c in pinned.choices] == [_typed(value)]


def test_a_text_choice_may_not_look_like_an_encoded_list():
    with pytest.raises(ConfigError, match="may not start with 'json:'"):
        parse_distribution("model.setting", "choice('json:[1]', a)", None)
