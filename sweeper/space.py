"""Hydra sweep grammar -> Optuna distributions.

A search space is written in Hydra's sweep grammar, keyed by the setting it samples::

    train.lr: tag(log, interval(1e-4, 1e-1))   -> FloatDistribution(log=True)
    train.batch_size: choice(32, 64, 128)      -> CategoricalDistribution
    model.filters: range(16, 65, step=16)      -> IntDistribution(16, 64, step=16)
    model.dropout: interval(0, 0.5)            -> FloatDistribution (dropout is a float)
    model.dense_units: interval(32, 128)       -> IntDistribution (dense_units is an int)

Hydra's parser reads the expression (casts, keyword arguments, ``tag``, ``sort`` and
``shuffle`` included), and the setting's declared type decides the distribution's type;
an explicit ``int(...)`` or ``float(...)`` cast wins over it (``int(...)`` on a float setting
samples whole numbers, as floats: the trial gets the setting's type). (The hydra-optuna-sweeper
plugin guesses the type from how the bounds are written instead, so ``interval(0, 1)`` for
a float setting became an integer distribution there, and here until issue 19.) Unlike the
plugin, ``range`` keeps Hydra's meaning (the stop is excluded), so ``range(16, 65,
step=16)`` samples 16, 32, 48 or 64 and never 65.

``choice`` may also hold lists and dicts (``choice([16, 32], [32, 64])`` for a builder taking
a list of widths). Optuna's categorical choices can only be None, bools, numbers and strings,
so such a value is kept in the distribution as its JSON text behind :data:`ENCODED`
(``"json:[16, 32]"``, as the study and optuna-dashboard show it) and decoded
(:func:`decode_params`) where the searcher hands a trial its values: the trial, the console,
the summary, TensorBoard and ``best_config.yaml`` all get the list itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, QuotedString, RangeSweep
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
    not_searchable_reason,
    setting_type,
    validate_trial_settings,
)

FORMS = ("choice(a, b, ...), range(start, stop[, step]), interval(low, high), "
         "tag(log, interval(low, high)), with int(...)/float(...) casts")
MAX_RANGE_VALUES = 1_000_000  # Hydra's listing of a range is walked once, value by value
_CASTS = {"int": int, "float": float, "str": str, "bool": bool}


def _fail(key: str, expression: Any, why: str) -> ConfigError:
    return ConfigError(f"search.space.{key}", expression, f"{why}; allowed forms: {FORMS}")


def _parse_with_casts(key: str, expression: str) -> tuple[Any, type | None]:
    """Hydra's reading of ``key=expression``: the sweep and the outermost cast (or None).

    Hydra applies a cast to the values and forgets it; wrapping its cast functions shows which
    one was written, so that ``float(interval(0, 1))`` and ``interval(0, 1)`` (both floats to
    Hydra) can be told apart where the setting is an integer.
    """
    parser = OverridesParser.create()
    casts: list[type] = []
    for name, kind in _CASTS.items():
        hydra_cast = parser.functions.functions[name]

        def recording(*args: Any, _cast=hydra_cast, _kind=kind, **kwargs: Any) -> Any:
            casts.append(_kind)  # Hydra evaluates the innermost call first
            return _cast(*args, **kwargs)

        parser.functions.functions[name] = recording
    try:
        override = parser.parse_override(f"{key}={expression}")
    except HydraException as error:
        first_line = str(error).strip().splitlines()[0]
        raise _fail(key, expression, f"cannot parse ({first_line})") from None
    if not override.is_sweep_override():
        raise _fail(key, expression, "is a fixed value, not a search range")
    return override.value(), (casts[-1] if casts else None)


def parse_distribution(key: str, expression: Any, declared: type | None = None) -> BaseDistribution:
    """Turn one Hydra sweep expression into an Optuna distribution of the setting's type.

    Args:
        key: Dotted config path the expression samples, e.g. ``train.lr``.
        expression: The sweep expression as a string.
        declared: The setting's type (int, float, bool or str); None looks it up in the
            config schema by ``key``.

    Returns:
        ``CategoricalDistribution`` for ``choice`` (values converted to the type: ``choice(0,
        1)`` for a float setting samples 0.0 and 1.0); ``IntDistribution`` or
        ``FloatDistribution`` for ``range`` and ``interval``, by the explicit cast if one is
        written, else by the declared type; ``tag(log, ...)`` makes it log-uniform.

    Raises:
        ConfigError: The expression is not one of the supported forms, its bounds are empty,
            or its values do not fit the setting's type.
    """
    if not isinstance(expression, str):
        raise _fail(key, expression, "must be a sweep expression string")
    if declared is None:
        declared = setting_type(*key.partition(".")[::2])
    sweep, cast = _parse_with_casts(key, expression)
    tags = set(getattr(sweep, "tags", set()) or set())
    unknown_tags = tags - {"log"}
    if unknown_tags:
        raise _fail(key, expression, f"unknown tag {sorted(unknown_tags)[0]!r} (only 'log')")
    kind = cast or declared
    # int(...) on a float setting asks for whole numbers, and the trial gets them as floats
    # (apply_params): sampled as floats here, so that the console, the summary and the trial
    # see one value (issue 41: int(choice(1, 2)) for train.lr showed 1, the trial got 1.0).
    whole_floats = cast is int and declared is float
    if whole_floats:
        kind = float

    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise _fail(key, expression, "tag(log, ...) applies to interval and range only")
        choices = [_plain(choice) for choice in sweep.list]
        if not choices:
            raise _fail(key, expression, "choice needs one or more values")
        for choice in choices:
            if isinstance(choice, str) and choice.startswith(ENCODED):
                raise _fail(key, expression, f"a text value may not start with {ENCODED!r} "
                                             "(sweeper's mark for lists and dicts)")
        choices = [_as_kind(key, expression, choice, kind) for choice in choices]
        encoded = [encode_choice(choice) for choice in choices]
        if len(set(map(repr, encoded))) != len(encoded):
            raise _fail(key, expression, "choice has repeated values")
        return CategoricalDistribution(encoded)

    if isinstance(sweep, (RangeSweep, IntervalSweep)) and kind in (str, bool):
        raise _fail(key, expression, f"{key} is {_TYPE_WORDS[kind]} setting; "
                                     "sample it with choice(...)")
    if isinstance(sweep, RangeSweep):
        return _range_distribution(key, expression, sweep, kind, log="log" in tags)

    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not (low < high):
            raise _fail(key, expression, "interval needs low < high")
        log = "log" in tags
        if log and low <= 0:
            raise _fail(key, expression, "tag(log, ...) needs low > 0")
        if kind is int:
            if not (float(low).is_integer() and float(high).is_integer()):
                raise _fail(key, expression, f"{key} is an integer setting; give integer bounds "
                                             "or cast with int(...)")
            return IntDistribution(int(low), int(high), log=log)
        if whole_floats:
            if log:
                raise _fail(key, expression, "tag(log, int(...)) of a number setting: Optuna has "
                                             "no log-uniform float steps; drop int(...)")
            return FloatDistribution(float(low), float(high), step=1.0)
        return FloatDistribution(float(low), float(high), log=log)

    raise _fail(key, expression, f"{type(sweep).__name__} sweeps are not supported")


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a text", bool: "a true/false"}


def _as_kind(key: str, expression: str, value: Any, kind: type | None) -> Any:
    """A choice's value as the setting's type; refuses a value of another kind."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and is_number:
        return float(value)
    if kind is int and is_number and float(value).is_integer():
        return int(value)
    if kind is str and isinstance(value, bool):
        return str(value).lower()  # Hydra reads `true` as a bool; the setting wants the word
    if kind is str and isinstance(value, (int, float)):
        return str(value)
    if kind is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise _fail(key, expression, f"{key} is {_TYPE_WORDS[kind]} setting; {value!r} is not one"
                + ("" if kind in (int, float) else "; sample it with choice(...)"))


def _range_distribution(key: str, expression: str, sweep: RangeSweep, kind: type | None,
                        log: bool) -> BaseDistribution:
    if not sweep.step:
        raise _fail(key, expression, "range needs a non-zero step")
    if (sweep.stop - sweep.start) / sweep.step > MAX_RANGE_VALUES:
        raise _fail(key, expression, f"range lists more than {MAX_RANGE_VALUES} values; "
                                     "sample it with interval(low, high)")
    # Hydra's own listing of the range (stop excluded; float steps in decimal arithmetic, as
    # its basic sweeper runs them); sort(..., reverse=true) and shuffle only reorder it.
    values = list(sweep.range())
    if not values:
        raise _fail(key, expression, "range is empty (stop is excluded, as in Hydra)")
    low, high, step = min(values), max(values), abs(sweep.step)
    if kind is None:
        kind = int if all(isinstance(v, int) for v in (*values, step)) else float
    if kind is int:
        if not all(float(v).is_integer() for v in (low, step)):
            raise _fail(key, expression, f"{key} is an integer setting; give integer start and "
                                         "step or cast with int(...)")
        if log and step != 1:
            raise _fail(key, expression, "tag(log, range(...)) needs step 1 (Optuna samples "
                                         "log-uniform integers only with step 1)")
        return IntDistribution(int(low), int(high), step=int(step), log=log)
    if log:
        raise _fail(key, expression, "tag(log, ...) of a number setting applies to interval "
                                     "only (Optuna has no log-uniform float steps)")
    # Round away float noise so the last value is the one Hydra lists.
    return FloatDistribution(float(low), round(float(high), 12), step=float(step))


def _plain(value: Any) -> Any:
    """Hydra may hand back its own node types; lists and dicts (nested too) stay lists and
    dicts, anything else that is not a plain value becomes its text."""
    if isinstance(value, QuotedString):  # 'a' inside a list: Hydra keeps its quotes apart
        return value.text
    if isinstance(value, Mapping):
        return {str(name): _plain(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(item) for item in value]
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


# The mark of a list or dict kept in an Optuna categorical distribution as its JSON text.
ENCODED = "json:"


def encode_choice(value: Any) -> Any:
    """``value`` as Optuna can hold it in a categorical distribution: None, bools, numbers and
    strings as they are, lists and dicts (tuples become lists) as ``"json:<JSON text>"``."""
    if isinstance(value, (list, tuple, Mapping)):
        return ENCODED + json.dumps(_plain(value))
    return value


def decode_choice(value: Any) -> Any:
    """The value :func:`encode_choice` was given (a list for a tuple); others as they are."""
    if isinstance(value, str) and value.startswith(ENCODED):
        return json.loads(value[len(ENCODED):])
    return value


def decode_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled ``{"group.setting": value}`` with every list and dict decoded, as a trial
    gets them."""
    return {key: decode_choice(value) for key, value in params.items()}


def choice_text(value: Any) -> str:
    """How a sampled value reads in a table or a TensorBoard column: lists and dicts as
    JSON (``[16, 32]``, ``{"scale": 2}``), other values as ``str`` does."""
    value = decode_choice(value)
    return json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)


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
        custom = group == "model" and isinstance(cfg.model, Mapping)
        if not custom and not hasattr(getattr(cfg, group), name):
            raise ConfigError(f"search.space.{key}", expression,
                              f"{key} is not a setting of the {group} config")
        why_not = not_searchable_reason(group, name)
        if why_not:
            raise ConfigError(f"search.space.{key}", expression, f"cannot be searched: {why_not}")
        distribution = parse_distribution(key, expression, declared_type(cfg, group, name))
        _check_bounds(cfg, key, expression, distribution)
        space[key] = distribution
    return space


def configured_point(cfg: SweepConfig, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """The config's own values of the searched settings, as a point of ``space``: the first
    trial of a sweep with ``search.start_with_defaults``.

    Raises:
        ConfigError: A configured value lies outside its setting's search space (the searcher
            would sample another value instead of trying it).
    """
    point = {}
    for key, distribution in space.items():
        group, _, name = key.partition(".")
        section = getattr(cfg, group)
        value = section.get(name) if isinstance(section, Mapping) else getattr(section, name)
        if isinstance(distribution, CategoricalDistribution):
            inside = encode_choice(value) in distribution.choices
        else:
            inside = (_fits_type(value, float) and distribution.low <= value <= distribution.high
                      and (distribution.step is None
                           or math.isclose((value - distribution.low) / distribution.step,
                                           round((value - distribution.low) / distribution.step))))
        if not inside:
            expression = flatten_space(cfg.search.space).get(key)
            raise ConfigError(key, value,
                              f"{key} is searched over {expression} and "
                              "search.start_with_defaults=true trains the configured value "
                              "in the first trial; set one the space holds, or "
                              "search.start_with_defaults=false")
        point[key] = encode_choice(value)  # as the study holds it
    return point


def declared_type(cfg: SweepConfig, group: str, name: str) -> type | None:
    """The type a searched setting's values take: the schema's for sweeper's own settings;
    for a user's model (no schema), the type of the value its config gives, else of its
    builder's default (``width=32`` makes width an integer); None when neither tells."""
    if group != "model" or not isinstance(cfg.model, Mapping):
        return setting_type(group, name)
    from sweeper.builder import parameter_default

    value = cfg.model.get(name)
    if value is None:
        value = parameter_default(cfg.model, name)
    return type(value) if type(value) in (int, float, bool, str) else None


def _extremes(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


def _fits_type(value: Any, declared: type | None) -> bool:
    """Whether a sampled value can be the setting's value as it is (an int may be a float)."""
    if declared is None:
        return True
    if declared is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, declared) and not (declared is int and isinstance(value, bool))


def _check_bounds(cfg: SweepConfig, key: str, expression: Any,
                  distribution: BaseDistribution) -> None:
    """Every extreme value of the distribution has the setting's type and passes the same
    validation as a hand-written config."""
    group, _, name = key.partition(".")
    declared = declared_type(cfg, group, name)
    for value in map(decode_choice, _extremes(distribution)):
        if not _fits_type(value, declared):
            # A cast chose another type than the setting's, e.g. float(interval(...)) for an
            # integer setting: refuse rather than let a trial round the value.
            raise ConfigError(f"search.space.{key}", expression,
                              f"{key} is {_TYPE_WORDS[declared]} setting; {value!r} is not one")
        trial = apply_params(cfg, {key: value})
        try:
            validate_trial_settings(trial.data, trial.model, trial.train)
        except ConfigError as error:
            raise ConfigError(f"search.space.{key}", expression,
                              f"includes {value!r}, but {error.allowed}") from None
