"""The Optuna study: storage, creation / resume, heartbeats and recovery of trials whose process died.

Storages are Optuna's own: SQLite (default), any RDB URL (PostgreSQL for many machines) and
JournalStorage with a file backend (``journal:///path/to/study.log``, many processes on one machine).
Optuna's heartbeat exists only for RDB storages, so a trial's liveness is recorded here, the same way
for every storage: the owning process (host:pid) and a heartbeat time in the trial's user attributes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from ._io import pid_alive
from .errors import StorageError

OWNER_ATTR = "owner"
HEARTBEAT_ATTR = "heartbeat"
DEFAULT_HEARTBEAT = 10.0  # seconds; a RUNNING trial silent for GRACE_FACTOR x this is failed and retried
GRACE_FACTOR = 3.0
JOURNAL_SCHEME = "journal:///"
_log = logging.getLogger("autoquant")


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_storage(storage: str | BaseStorage | None, output_dir: Path) -> BaseStorage:
    """The user's storage (URL or object), or SQLite at output_dir/study.db. Every failure to open it (a
    missing folder, a corrupt database or journal file, a bad URL) is a StorageError saying which."""
    if isinstance(storage, BaseStorage):
        return storage
    if storage is None:
        url = f"sqlite:///{(output_dir / 'study.db').resolve()}"
        return _fast_sqlite(_rdb(url, f"the study database {output_dir / 'study.db'}"))
    if isinstance(storage, str) and storage.startswith(JOURNAL_SCHEME):
        path = Path("/" + storage[len(JOURNAL_SCHEME):].lstrip("/"))
        if not path.parent.is_dir():
            raise StorageError(f"journal storage {storage!r}: folder {path.parent} does not exist; create it first")
        if path.is_dir():
            raise StorageError(f"journal storage {storage!r}: {path} is a directory; name a file")
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:  # a file that is not an Optuna journal (garbage, truncated mid-record)
            raise StorageError(f"journal storage {storage!r} cannot be read: {type(exc).__name__}: "
                               f"{str(exc)[:200]}; move the file away to start a new study") from None
    if isinstance(storage, str):
        url = storage
    else:
        raise StorageError(f"storage must be an Optuna storage URL or object, got {type(storage).__name__}")
    return _rdb(url, f"Optuna storage {url!r}")


def _rdb(url: str, what: str) -> RDBStorage:
    """RDBStorage(url), with SQLite's schema creation serialised between processes of this machine (two
    optimize() calls starting at once on one file raced to create the tables: IntegrityError)."""
    sqlite_file = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
    try:
        if sqlite_file is None:
            return RDBStorage(url)
        if sqlite_file.is_dir():
            raise StorageError(f"{what}: {sqlite_file} is a directory, not a database file; move it away")
        with file_lock(f"sqlite-{sqlite_file.resolve()}"):
            return RDBStorage(url)
    except StorageError:
        raise
    except Exception as exc:
        hint = ""
        if sqlite_file is not None and not sqlite_file.parent.exists():
            hint = " (the folder of the SQLite file does not exist; create it first)"
        elif sqlite_file is not None and sqlite_file.exists():
            hint = " (the file is not a readable SQLite database: move it away to start a new study)"
        raise StorageError(f"cannot open {what}: {type(exc).__name__}: {str(exc)[:200]}{hint}") from None


@contextlib.contextmanager
def file_lock(key: str):
    """An exclusive lock between processes of this machine, on a file in the temp dir named by ``key``'s hash.

    The file is deleted on release, by its holder, before unlocking. A waiter may thus lock a file that was
    unlinked meanwhile: it then retries on whatever file the path now names, so exactly one process holds
    the lock on the current file at any time.
    """
    import fcntl
    import hashlib
    import tempfile

    path = Path(tempfile.gettempdir()) / f"autoquant-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            held = os.fstat(f.fileno())
            current = os.stat(path)
        except FileNotFoundError:  # unlinked by the previous holder after we opened it
            f.close()
            continue
        except BaseException:
            f.close()
            raise
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        f.close()  # the path names a newer file now: lock that one
    try:
        yield
    finally:
        try:
            with contextlib.suppress(OSError):  # e.g. another user's file in a sticky /tmp: it just stays
                path.unlink(missing_ok=True)  # while still holding the lock (see the docstring)
        finally:
            f.close()  # closing releases the flock


def _fast_sqlite(storage: RDBStorage) -> RDBStorage:
    """WAL journal + synchronous=NORMAL for our own SQLite file.

    Every Optuna attribute / param write is a transaction; in the default rollback-journal mode each
    one fsyncs, which costs more than building a model. WAL with NORMAL sync stays consistent across
    process kills (a power loss may drop the last transactions), at about half the cost per trial.
    """
    import sqlalchemy

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # reconnect so every pooled connection gets the pragmas
    return storage


def create_or_load(storage: BaseStorage, name: str, higher_is_better: bool, seed: int, n_trials: int) -> optuna.Study:
    # multivariate + group: knobs interact (e.g. calibration x activation bits), so model them jointly;
    # group handles the conditional `percentile` knob. It also samples a trial in one pass over history.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, n_trials // 3)),
                                             multivariate=True, group=True)
    directions = ["maximize" if higher_is_better else "minimize", "minimize"]  # accuracy, model bytes
    try:
        # Load first, create only if absent: a kill during SQLite schema creation can leave the studies
        # table without its unique index, and create_study(load_if_exists=True) would then insert a
        # second study of the same name instead of loading the first.
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        if [d.name.lower() for d in study.directions] != directions:
            raise StorageError(f"study {name!r} was created with higher_is_better="
                               f"{study.directions[0].name == 'MAXIMIZE'}, this call passes higher_is_better="
                               f"{higher_is_better}; pass another study_name or output_dir")
        return study
    except KeyError:
        pass
    try:
        return optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                   load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with other directions
        raise StorageError(f"study {name!r} exists in the storage with different settings: {exc}") from None


class Heartbeat:
    """Context manager: writes the trial's heartbeat time every ``interval`` seconds from a thread."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float):
        self._storage, self._trial_id, self._interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="autoquant-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # the trial finished meanwhile, or the storage hiccupped: the next beat retries
                pass

    def __enter__(self) -> "Heartbeat":
        self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def is_stale(trial: optuna.trial.FrozenTrial, grace: float, now: float | None = None) -> bool:
    """A RUNNING trial whose process is gone: dead pid on this host, or no heartbeat for ``grace`` s."""
    now = time.time() if now is None else now
    owner = trial.user_attrs.get(OWNER_ATTR)
    if owner is None:  # killed between trial creation and its first attribute write
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return now - started > grace
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        if not pid_alive(int(pid)):
            return True
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    return beat is not None and now - float(beat) > grace


def recover_stale_trials(study: optuna.Study, trial_dir: Path | None = None,
                         grace: float = GRACE_FACTOR * DEFAULT_HEARTBEAT) -> list[int]:
    """Fail RUNNING trials whose process died, re-enqueue their configs, delete their partial model
    files (``trial_dir``). Safe with many workers: only the worker whose FAIL write succeeds re-queues.
    Returns the recovered trial numbers."""
    storage = study._storage
    waiting = [t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, grace):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", "process died while the trial was running")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker finished or failed it first
            continue
        if trial_dir is not None:
            (trial_dir / trial_file_name(t.number)).unlink(missing_ok=True)
        if (params := requeue(study, t, waiting)) is not None:
            waiting.append(params)
        recovered.append(t.number)
    if recovered:
        _log.warning("study %s: trials %s were left RUNNING by a dead process; marked FAIL and re-queued",
                     study.study_name, recovered)
    return recovered


def requeue(study: optuna.Study, trial, waiting: list[dict] | None = None) -> dict | None:
    """Enqueue the config of a trial that did not finish (its process died, or Ctrl-C stopped it) so that a
    later run or another worker scores it; returns the params, or None when it had none or they wait already."""
    if isinstance(trial, optuna.Trial):  # a live trial: read its stored record
        trial = study._storage.get_trial(trial._trial_id)
    params = dict(trial.system_attrs.get("fixed_params", {}))
    params.update(trial.params)
    if waiting is None:
        waiting = [t.system_attrs.get("fixed_params")
                   for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    if not params or params in waiting:
        return None
    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
    return params


def trial_folder(output_dir: Path, study_name: str) -> Path:
    """Where a study's trial models live: one folder per study, so two studies (two models, or two spaces)
    in one output_dir never write over each other's files."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_name)[:80]
    if safe != study_name:  # keep distinct names distinct
        safe += "-" + hashlib.sha256(study_name.encode()).hexdigest()[:8]
    return output_dir / "trials" / safe


def trial_file_name(number: int) -> str:
    return f"trial_{number:05d}.onnx"


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def study_attrs(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs)
