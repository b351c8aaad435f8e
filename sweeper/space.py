"""Hydra sweep grammar -> Optuna distributions.

A search space is written the way the hydra-optuna-sweeper plugin reads it::

    train.lr: tag(log, interval(1e-4, 1e-1))   -> FloatDistribution(log=True)
    train.batch_size: choice(32, 64, 128)      -> CategoricalDistribution
    model.filters: range(16, 65, step=16)      -> IntDistribution(16, 64, step=16)
    model.dropout: interval(0.0, 0.5)          -> FloatDistribution
    model.dense_units: interval(32, 128)       -> IntDistribution (integer bounds)

Unlike the plugin, ``range`` keeps Hydra's meaning (the stop is excluded), so
``range(16, 65, step=16)`` samples 16, 32, 48 or 64 and never 65.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sweeper.config import (
    SEARCHABLE_GROUPS,
    ConfigError,
    SweepConfig,
    apply_params,
    validate_trial_settings,
)

# Hydra turns interval bounds into floats; integer bounds written as such mean an int setting.
_INT_INTERVAL = re.compile(r"interval\(\s*(start\s*=\s*)?[+-]?\d+\s*,\s*(end\s*=\s*)?[+-]?\d+\s*\)")

FORMS = ("choice(a, b, ...), range(start, stop[, step]), interval(low, high), "
         "tag(log, interval(low, high))")


def _fail(key: str, expression: Any, why: str) -> ConfigError:
    return ConfigError(f"search.space.{key}", expression, f"{why}; allowed forms: {FORMS}")


def parse_distribution(key: str, expression: Any) -> BaseDistribution:
    """Turn one Hydra sweep expression into an Optuna distribution.

    Args:
        key: Dotted config path the expression samples, e.g. ``train.lr`` (for messages).
        expression: The sweep expression as a string.

    Raises:
        ConfigError: The expression is not one of the supported forms or its bounds are empty.
    """
    if not isinstance(expression, str):
        raise _fail(key, expression, "must be a sweep expression string")
    parser = OverridesParser.create()
    try:
        override = parser.parse_override(f"{key}={expression}")
    except HydraException as error:
        first_line = str(error).strip().splitlines()[0]
        raise _fail(key, expression, f"cannot parse ({first_line})") from None
    if not override.is_sweep_override():
        raise _fail(key, expression, "is a fixed value, not a search range")
    sweep = override.value()
    tags = set(getattr(sweep, "tags", set()) or set())
    unknown_tags = tags - {"log"}
    if unknown_tags:
        raise _fail(key, expression, f"unknown tag {sorted(unknown_tags)[0]!r} (only 'log')")

    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise _fail(key, expression, "tag(log, ...) applies to interval only")
        choices = [_plain(choice) for choice in sweep.list]
        if not choices or any(isinstance(c, (list, dict)) for c in choices):
            raise _fail(key, expression, "choice needs one or more plain values")
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(key, expression, "choice has repeated values")
        return CategoricalDistribution(choices)

    if isinstance(sweep, RangeSweep):
        if tags:
            raise _fail(key, expression, "tag(log, ...) applies to interval only")
        return _range_distribution(key, expression, sweep)

    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not (low < high):
            raise _fail(key, expression, "interval needs low < high")
        log = "log" in tags
        if log and low <= 0:
            raise _fail(key, expression, "tag(log, ...) needs low > 0")
        if _INT_INTERVAL.search(expression):
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)

    raise _fail(key, expression, f"{type(sweep).__name__} sweeps are not supported")


def _range_distribution(key: str, expression: str, sweep: RangeSweep) -> BaseDistribution:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step is None or step <= 0:
        raise _fail(key, expression, "range needs a positive step")
    if sweep.shuffle:
        raise _fail(key, expression, "shuffle(range(...)) means nothing to a sampler")
    count = math.ceil((stop - start) / step)
    if count < 1:
        raise _fail(key, expression, "range is empty (stop is excluded, as in Hydra)")
    last = start + (count - 1) * step
    if all(isinstance(v, int) for v in (start, stop, step)):
        return IntDistribution(start, last, step=step)
    # Float ranges: round away float noise so the last value is the one Hydra would list.
    return FloatDistribution(float(start), round(float(last), 12), step=float(step))


def _plain(value: Any) -> Any:
    """Hydra may hand back its own node types; Optuna wants plain Python values."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``{"train": {"lr": "..."}}`` -> ``{"train.lr": "..."}``."""
    flat: dict[str, Any] = {}
    for name, value in space.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_space(value, prefix=f"{key}."))
        else:
            flat[key] = value
    return flat


def build_search_space(cfg: SweepConfig) -> dict[str, BaseDistribution]:
    """Parse and check ``search.space`` against the config it samples.

    Each key must name an existing data/model/train setting, and the extreme values of its
    distribution must pass the same validation as a hand-written config, so a space like
    ``train.lr: interval(-1, 1)`` fails before any trial starts.
    """
    flat = flatten_space(cfg.search.space)
    if not flat:
        raise ConfigError("search.space", {}, "needs at least one parameter to search")
    space: dict[str, BaseDistribution] = {}
    for key, expression in flat.items():
        group, _, name = key.partition(".")
        if group not in SEARCHABLE_GROUPS or not name or "." in name:
            raise ConfigError(f"search.space.{key}", expression,
                              f"keys must be <group>.<setting> with group in {SEARCHABLE_GROUPS}")
        if not hasattr(getattr(cfg, group), name):
            raise ConfigError(f"search.space.{key}", expression,
                              f"{key} is not a setting of the {group} config")
        distribution = parse_distribution(key, expression)
        _check_bounds(cfg, key, expression, distribution)
        space[key] = distribution
    return space


def _extremes(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


def _check_bounds(cfg: SweepConfig, key: str, expression: Any,
                  distribution: BaseDistribution) -> None:
    group, _, name = key.partition(".")
    declared = getattr(getattr(cfg, group), name)
    for value in _extremes(distribution):
        if isinstance(declared, int) and not isinstance(declared, bool) and not (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            raise ConfigError(f"search.space.{key}", expression,
                              f"{key} is an integer setting; sample it with integers")
        if isinstance(declared, str) and not isinstance(value, str):
            raise ConfigError(f"search.space.{key}", expression,
                              f"{key} is a text setting; sample it with choice(...)")
        trial = apply_params(cfg, {key: value})
        try:
            validate_trial_settings(trial.data, trial.model, trial.train)
        except ConfigError as error:
            raise ConfigError(f"search.space.{key}", expression,
                              f"includes {value!r}, but {error.allowed}") from None
