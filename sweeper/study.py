"""The persistent Optuna study: where it is stored, and warm starts from earlier studies.

The study outlives the driver, ``optuna-dashboard`` can watch it while the sweep writes it,
and a later sweep can learn from it. By default it is Optuna's journal file in the sweep
folder (``optuna.log``: ``JournalStorage`` on ``JournalFileBackend``): an append-only log that
the driver replays in memory, so reading the study for each suggestion costs no database
query. With 256 trials running, a trial's ask and tell cost 58x less than on a SQLite file
(benchmarks/RESULTS.md section 5, ``benchmarks.scaling.study_cost``; issue 26).
``search.storage`` names a database instead (Optuna's RDB storage: ``sqlite:///...``,
``postgresql://...``), and a sweep folder begun with a SQLite study (``optuna.db``, sweeper
before issue 26) keeps it when it resumes.

A location is a string: a database URL (it has ``://``) or the path of a journal file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper.compat import journal_file
from sweeper.config import ConfigError
from sweeper.layout import SweepLayout

logger = logging.getLogger(__name__)

STUDY_FILENAME = SweepLayout.STUDY
SQLITE_STUDY_FILENAME = SweepLayout.SQLITE_STUDY
SQLITE_PREFIX = "sqlite:///"
WARM_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# The study's user attribute that says what its trials measured (:func:`sweep_attrs`), so
# that a later sweep's warm start can check it.
SWEEP_ATTR = "sweeper_sweep"


def study_location(configured: str | None, sweep_dir: Path) -> str:
    """Where the sweep's study is: the configured database URL; else the journal file
    ``<sweep_dir>/optuna.log``, or, for a sweep folder that holds a SQLite study and no
    journal (begun before issue 26), its ``optuna.db`` as a ``sqlite:///`` URL."""
    if configured:
        return configured
    sqlite = sweep_dir / SQLITE_STUDY_FILENAME
    if sqlite.is_file() and not (sweep_dir / STUDY_FILENAME).exists():
        return f"{SQLITE_PREFIX}{sqlite}"
    return str(sweep_dir / STUDY_FILENAME)


def is_database(location: str) -> bool:
    """Whether a study location is a database URL (else it is a journal file's path)."""
    return "://" in location


def study_url_in_sweep(location: str, sweep_dir: Path) -> str:
    """``location`` as summary.json keeps it: a study file inside the sweep folder relative to
    it (``optuna.log``; ``sqlite:///optuna.db``, read from within the folder), anything else
    as it is."""
    if is_database(location):
        if location.startswith(SQLITE_PREFIX):
            path = Path(location.removeprefix(SQLITE_PREFIX))
            if path.is_relative_to(sweep_dir):
                return f"{SQLITE_PREFIX}{path.relative_to(sweep_dir).as_posix()}"
        return location
    path = Path(location)
    return path.relative_to(sweep_dir).as_posix() if path.is_relative_to(sweep_dir) else location


def open_storage(location: str) -> optuna.storages.BaseStorage:
    """The study storage at ``location`` for the sweep that owns it: a journal file
    (:func:`open_journal`, mended first) or a database URL (:func:`open_database`).

    Raises:
        ConfigError: A database that cannot be opened (``search.storage``).
    """
    if is_database(location):
        return open_database(location)
    return open_journal(Path(location), owner=True)


def read_storage(location: str) -> optuna.storages.BaseStorage | str:
    """The study storage at ``location`` to read only (another sweep's, for a warm start): a
    journal file is neither mended nor locked; a database URL is returned for Optuna to
    open."""
    return location if is_database(location) else open_journal(Path(location), owner=False)


def open_journal(path: Path, owner: bool) -> JournalStorage:
    """Optuna's journal storage on the file ``path`` (created if missing).

    The owner is the sweep's driver (the CLI holds the sweep folder's lock): before opening,
    it drops what a killed driver left half written, the cut last line of an append (Optuna
    reads past it, but the next append would be joined to it and make the log unreadable from
    there), and the journal's own lock file when it is older than :data:`STALE_LOCK_S` (a live
    one is held for the milliseconds of one append; a killed driver's stays, and Optuna would
    wait 30 s on it before taking over). Every append is fsynced by Optuna, and the searcher
    writes its buffered epochs before each save of the experiment state, so the append a kill
    interrupts (epochs of up to
    :data:`sweeper.searcher.STUDY_WRITE_EVERY_S` seconds, or a trial's end) holds only what
    came after the last saved state: the resumed sweep trains those epochs again from the
    trials' checkpoints and reports and tells them anew. Nothing a resume needs is lost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if owner:
        _mend_journal(path)
    return JournalStorage(journal_file(str(path)))


STALE_LOCK_S = 10.0


def _mend_journal(path: Path) -> None:
    lock = Path(f"{path}.lock")  # optuna.storages.journal._file.LOCK_FILE_SUFFIX
    if ((lock.is_symlink() or lock.exists())
            and time.time() - lock.lstat().st_mtime > STALE_LOCK_S):
        lock.unlink(missing_ok=True)
        logger.info("Removed the study journal's lock %s, left by a driver that was killed",
                    lock)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as journal:
        journal.seek(-1, os.SEEK_END)
        if journal.read(1) == b"\n":
            return
        size = journal.seek(0, os.SEEK_END)
        keep = 0
        while keep == 0 and size > 0:  # the last newline, read backwards in blocks
            start = max(0, size - 65536)
            journal.seek(start)
            block = journal.read(size - start)
            newline = block.rfind(b"\n")
            keep, size = (start + newline + 1 if newline >= 0 else 0), start
        journal.truncate(keep)
        journal.flush()
        os.fsync(journal.fileno())
    logger.warning("The study journal %s ended in half an entry (the driver was killed while "
                   "writing it); dropped it", path)


def open_database(url: str) -> optuna.storages.RDBStorage:
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
    """The study location and name that ``search.warm_start`` points at: an earlier sweep's
    folder (its ``optuna.log``, or its ``optuna.db`` from before issue 26), a journal file,
    or a database URL.

    Raises:
        ConfigError: No study there, or not exactly one study when ``study_name`` is None.
    """
    if is_database(source):
        location = source
    else:
        given = Path(source).expanduser()
        found = [path for path in (given, given / STUDY_FILENAME, given / SQLITE_STUDY_FILENAME)
                 if path.is_file()]
        if found:
            with open(found[0], "rb") as study_file:
                sqlite = study_file.read(16) == b"SQLite format 3\0"  # SQLite's file header
            location = (f"{SQLITE_PREFIX}{found[0].resolve()}" if sqlite
                        else str(found[0].resolve()))
        else:
            raise ConfigError("search.warm_start", source,
                              f"no {STUDY_FILENAME} or {SQLITE_STUDY_FILENAME} there; give an "
                              "earlier sweep's folder, its study file or a storage URL")
    try:
        names = optuna.get_all_study_names(storage=read_storage(location))
    except Exception as error:
        raise ConfigError("search.warm_start", source, f"cannot read studies ({error})") from None
    if study_name is not None:
        if study_name not in names:
            raise ConfigError("search.warm_start_study", study_name,
                              f"studies in {source}: {', '.join(names) or 'none'}")
        return location, study_name
    if len(names) != 1:
        raise ConfigError("search.warm_start_study", None,
                          f"{source} holds {len(names)} studies; choose one of "
                          f"{', '.join(names) or 'none'}")
    return location, names[0]


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


def earlier_trials(location: str, study_name: str,
                   space: dict[str, BaseDistribution]) -> list[FrozenTrial]:
    """Finished and pruned trials of an earlier study that fit ``space``, ready to add.

    A trial fits when it has exactly the space's parameters, each with a value the space's
    distribution can sample (a categorical's choices, a range's bounds and step); it is added
    with this sweep's distributions, whatever the earlier ones were (log or linear, another
    range). The others are left out and counted in the log line. Check the two studies
    measure the same thing first (:func:`check_warm_start`).
    """
    study = optuna.load_study(study_name=study_name, storage=read_storage(location))
    copies = []
    for trial in study.get_trials(deepcopy=False, states=WARM_STATES):
        if not fits_space(trial, space):
            continue
        copies.append(optuna.trial.create_trial(
            state=trial.state,
            values=trial.values,
            # In this space's types: an earlier 3.0 becomes 3 for an integer parameter.
            params={name: distribution.to_external_repr(distribution.to_internal_repr(
                trial.params[name])) for name, distribution in space.items()},
            distributions=space,
            intermediate_values=trial.intermediate_values,
            user_attrs={"warm_start_from": f"{study_name}#{trial.number}"},
        ))
    left_out = len(study.get_trials(deepcopy=False, states=WARM_STATES)) - len(copies)
    logger.info("Warm start: %d trials of study %s fit the search space%s", len(copies),
                study_name, f" ({left_out} left out: outside it)" if left_out else "")
    return copies


def sweep_attrs(metric: str, mode: str, epochs: int, data: dict[str, Any],
                data_digest: str | None) -> dict[str, Any]:
    """What a sweep's trial values mean, kept in its study (:data:`SWEEP_ATTR`): the metric,
    ``max``/``min``, a trial's full epoch budget, the data settings' ``name``, ``path`` and
    ``url``, and the loaded data's digest (:func:`sweeper.data.data_fingerprint`)."""
    return {"metric": metric, "mode": mode, "epochs": epochs,
            "data": {key: data.get(key) for key in ("name", "path", "url")},
            "data_digest": data_digest}


def record_sweep_attrs(study: optuna.Study, attrs: dict[str, Any]) -> None:
    """Keep ``attrs`` (:func:`sweep_attrs`) in ``study`` unless it holds them already."""
    if SWEEP_ATTR not in study.user_attrs:
        study.set_user_attr(SWEEP_ATTR, attrs)


def _attrs_beside(location: str) -> dict[str, Any]:
    """:func:`sweep_attrs` of a study made before they were kept in it, from the sweep folder
    that holds its file (sweep_config.yaml, data_fingerprint.json); {} when there is none."""
    if is_database(location):
        if not location.startswith(SQLITE_PREFIX):
            return {}
        location = location.removeprefix(SQLITE_PREFIX)
    layout = SweepLayout(Path(location).parent)
    if not layout.sweep_config.is_file():
        return {}
    saved = yaml.safe_load(layout.sweep_config.read_text()) or {}
    search, data = saved.get("search") or {}, saved.get("data") or {}
    digest = None
    if layout.data_fingerprint.is_file():
        digest = json.loads(layout.data_fingerprint.read_text()).get("digest")
    return sweep_attrs(search.get("metric"), search.get("mode"),
                       (saved.get("train") or {}).get("epochs"), data, digest)


def check_warm_start(location: str, study_name: str, source: str, attrs: dict[str, Any]) -> None:
    """Refuse a warm start whose earlier trials measured something else than this sweep will.

    ``attrs`` is this sweep's :func:`sweep_attrs` (``data_digest`` None before its data is
    loaded: the digests are then compared later). The earlier study's come from the study
    itself or, for one made before sweeper kept them there, from its sweep folder. Must
    match: the study's single direction and ``search.mode``; the metric; ``train.epochs``
    (a trial's COMPLETE or PRUNED state and its per-epoch values depend on the budget); the
    data, by digest, or for an older sweep without one by ``data.name``, ``path`` and
    ``url``. A study that says nothing of its metric (not made by sweeper) is taken to hold
    this sweep's metric; its direction must still match. Optuna itself would add any of these
    trials without a word: it checks only that a trial's parameters fit its distributions
    (which :func:`earlier_trials` makes sure of).

    Raises:
        ConfigError: ``search.warm_start=SOURCE is invalid: ...`` naming what differs.
    """
    study = optuna.load_study(study_name=study_name, storage=read_storage(location))
    if len(study.directions) != 1:
        raise ConfigError("search.warm_start", source,
                          f"study {study_name} has {len(study.directions)} objectives; a warm "
                          "start needs a study of one")
    direction = "max" if study.direction == StudyDirection.MAXIMIZE else "min"
    earlier = study.user_attrs.get(SWEEP_ATTR) or _attrs_beside(location)
    metric = earlier.get("metric")
    if metric is None:
        logger.info("Warm start: study %s does not say what its values measure; taken as %s",
                    study_name, attrs["metric"])
    problems = []
    if (metric or attrs["metric"], direction) != (attrs["metric"], attrs["mode"]):
        problems.append(f"its trials measured {metric or 'values'} ({direction}), this sweep "
                        f"searches {attrs['metric']} ({attrs['mode']})")
    if earlier.get("epochs") not in (None, attrs["epochs"]):
        problems.append(f"its trials had train.epochs={earlier['epochs']}, this sweep "
                        f"{attrs['epochs']}")
    if earlier.get("data_digest") and attrs["data_digest"]:
        if earlier["data_digest"] != attrs["data_digest"]:
            problems.append(f"its trials trained on other data ({_data_named(earlier)}; "
                            f"this sweep {_data_named(attrs)})")
    elif (not earlier.get("data_digest") and earlier.get("data")
          and earlier["data"] != attrs["data"]):
        problems.append(f"its trials trained on other data ({_data_named(earlier)}; this "
                        f"sweep {_data_named(attrs)})")
    if problems:
        raise ConfigError("search.warm_start", source,
                          "; ".join(problems) + ": its values would mislead this search; warm "
                          "start from a sweep of the same metric, mode, epochs and data, or "
                          "leave search.warm_start out")


def _data_named(attrs: dict[str, Any]) -> str:
    data = attrs.get("data") or {}
    where = data.get("path") or data.get("url")
    return f"{data.get('name')}{f' at {where}' if where else ''}"
