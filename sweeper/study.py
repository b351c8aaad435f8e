"""The persistent Optuna study: where it is stored, and warm starts from earlier studies.

The study lives in an Optuna RDB storage (a SQLite file in the sweep folder by
default, or any database URL), so it outlives the driver, ``optuna-dashboard``
can watch it while the sweep writes it, and a later sweep can learn from it.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeper.config import ConfigError
from sweeper.layout import SweepLayout

logger = logging.getLogger(__name__)

STUDY_FILENAME = SweepLayout.STUDY
SQLITE_PREFIX = "sqlite:///"
WARM_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(configured: str | None, sweep_dir: Path) -> str:
    """The study's database URL: the configured one, else a SQLite file in the sweep folder."""
    return configured or f"{SQLITE_PREFIX}{sweep_dir / STUDY_FILENAME}"


def study_url_in_sweep(url: str, sweep_dir: Path) -> str:
    """``url`` as summary.json keeps it: a SQLite file inside the sweep folder relative to it
    (``sqlite:///optuna.db``, read from within the folder), any other database as it is."""
    if url.startswith(SQLITE_PREFIX):
        path = Path(url.removeprefix(SQLITE_PREFIX))
        if path.is_relative_to(sweep_dir):
            return f"{SQLITE_PREFIX}{path.relative_to(sweep_dir).as_posix()}"
    return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url``; a new SQLite file is created complete and in WAL mode.

    With write-ahead logging a reader (optuna-dashboard) never blocks the sweep's writes, so
    neither side sees "database is locked"; the mode is stored in the file. A new file is
    built under a temporary name and renamed into place, so a reader that polls for it never
    finds it half made (and never races the sweep to create Optuna's tables).
    """
    engine_kwargs: dict = {}
    if url.startswith(SQLITE_PREFIX):
        path = Path(url.removeprefix(SQLITE_PREFIX))
        engine_kwargs = {"connect_args": {"timeout": 60}}
        if not path.exists():
            _create_sqlite_study_file(path, engine_kwargs)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as error:  # SQLAlchemy raises many types for a bad URL or server
        raise ConfigError("search.storage", url,
                          f"cannot open the study database ({error})") from None


def _create_sqlite_study_file(path: Path, engine_kwargs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.creating")
    staging.unlink(missing_ok=True)
    with sqlite3.connect(staging) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    storage = optuna.storages.RDBStorage(f"{SQLITE_PREFIX}{staging}", engine_kwargs=engine_kwargs)
    storage.engine.dispose()  # the last connection closing folds the WAL into the file
    staging.replace(path)


def resolve_warm_start(source: str, study_name: str | None) -> tuple[str, str]:
    """Find the storage URL and study name that ``search.warm_start`` points at."""
    if "://" in source:
        url = source
    else:
        database = Path(source).expanduser() / STUDY_FILENAME
        if not database.is_file():
            raise ConfigError("search.warm_start", source,
                              f"no {STUDY_FILENAME} there; give an earlier sweep's folder "
                              "or a storage URL")
        url = f"{SQLITE_PREFIX}{database.resolve()}"
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as error:
        raise ConfigError("search.warm_start", source, f"cannot read studies ({error})") from None
    if study_name is not None:
        if study_name not in names:
            raise ConfigError("search.warm_start_study", study_name,
                              f"studies in {source}: {', '.join(names) or 'none'}")
        return url, study_name
    if len(names) != 1:
        raise ConfigError("search.warm_start_study", None,
                          f"{source} holds {len(names)} studies; choose one of "
                          f"{', '.join(names) or 'none'}")
    return url, names[0]


def fits_space(trial: FrozenTrial, space: dict[str, BaseDistribution]) -> bool:
    """Whether an earlier trial's parameters lie inside this sweep's search space."""
    if set(trial.params) != set(space):
        return False
    return all(_within(distribution, trial.params[name]) for name, distribution in space.items())


def _within(distribution: BaseDistribution, value) -> bool:
    """Whether ``value`` is one that ``distribution`` can sample, from its public attributes
    (Optuna's own check of a value is private)."""
    if isinstance(distribution, CategoricalDistribution):
        try:
            distribution.to_internal_repr(value)  # raises for a value not among the choices
        except (ValueError, TypeError):
            return False
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not distribution.low <= value <= distribution.high:
        return False
    step = distribution.step
    if step is None:
        return True
    # On the grid low, low+step, ...: Optuna rounds the same way (within a small tolerance).
    steps = (value - distribution.low) / step
    return abs(steps - round(steps)) < 1e-8


def earlier_trials(url: str, study_name: str,
                   space: dict[str, BaseDistribution]) -> list[FrozenTrial]:
    """Finished and pruned trials of an earlier study that fit ``space``, ready to add."""
    study = optuna.load_study(study_name=study_name, storage=url)
    copies = []
    for trial in study.get_trials(deepcopy=False, states=WARM_STATES):
        if not fits_space(trial, space):
            continue
        copies.append(optuna.trial.create_trial(
            state=trial.state,
            values=trial.values,
            params=trial.params,
            distributions=space,
            intermediate_values=trial.intermediate_values,
            user_attrs={"warm_start_from": f"{study_name}#{trial.number}"},
        ))
    logger.info("Warm start: %d trials of study %s fit the search space", len(copies), study_name)
    return copies
