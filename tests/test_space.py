"""Search spaces in Hydra's sweep grammar become Optuna distributions, or a clear ConfigError."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.config import ConfigError, SweepConfig, apply_params
from sweeper.space import build_search_space, flatten_space, parse_distribution

GRAMMAR = [
    ("choice(32, 64, 128)", CategoricalDistribution([32, 64, 128])),
    ("choice(0.1, 0.25)", CategoricalDistribution([0.1, 0.25])),
    ("choice(adam, sgd, rmsprop)", CategoricalDistribution(["adam", "sgd", "rmsprop"])),
    # Hydra's range excludes its stop: 16, 32, 48, 64 and never 65.
    ("range(16, 65, step=16)", IntDistribution(16, 64, step=16)),
    ("range(1, 5)", IntDistribution(1, 4, step=1)),
    ("range(16, 64, 16)", IntDistribution(16, 48, step=16)),
    ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("interval(16, 64)", IntDistribution(16, 64)),
    ("interval(0.0, 0.5)", FloatDistribution(0.0, 0.5)),
    ("interval(0, 0.5)", FloatDistribution(0.0, 0.5)),
    ("tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 1e-1, log=True)),
    ("tag(log, interval(8, 256))", IntDistribution(8, 256, log=True)),
]


@pytest.mark.parametrize(("expression", "expected"), GRAMMAR, ids=[e for e, _ in GRAMMAR])
def test_each_grammar_form_becomes_its_optuna_distribution(expression, expected):
    distribution = parse_distribution("model.filters", expression)
    assert distribution == expected
    assert type(distribution) is type(expected)


BAD_FORMS = [
    ("choice(", "cannot parse"),
    ("interval(1e-4)", "cannot parse"),
    ("choice()", "cannot parse"),
    ("choice(1, 1)", "repeated"),
    ("range(5, 5)", "empty"),
    ("range(5, 1)", "empty"),
    ("range(1, 4, step=-1)", "positive step"),
    ("shuffle(range(1, 4))", "shuffle"),
    ("interval(0.5, 0.5)", "low < high"),
    ("interval(0.5, 0.1)", "low < high"),
    ("tag(log, interval(0, 1))", "low > 0"),
    ("tag(log, interval(-1, 1))", "low > 0"),
    ("tag(sqrt, interval(1, 2))", "unknown tag 'sqrt'"),
    ("tag(log, choice(1, 2))", "interval only"),
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
    ({"model": {"filters": "interval(16.0, 64.0)"}}, "search.space.model.filters",
     "integer setting"),
    ({"model": {"filters": "choice(16, 32.5)"}}, "search.space.model.filters", "integer setting"),
    ({"train": {"optimizer": "choice(1, 2)"}}, "search.space.train.optimizer", "text setting"),
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
