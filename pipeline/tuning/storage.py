"""Where a study lives and what keeps it whole across processes and machines: storages, locks, heartbeats.

- `StudyLock` (a file lock beside a local storage, an advisory lock inside
  PostgreSQL, also behind a gRPC storage proxy: `tune.lock`) serialises what
  must happen once: creating the schema and the study, its MLflow parent run,
  and "count the trials, then start one", which keeps the study at exactly
  `tune.n_trials`;
- a trial whose process died is failed and retried: at once when it ran on
  this host (its process is gone), after `grace_period` otherwise (heartbeats:
  Optuna's for RDB storages, this module's `HEARTBEAT` through a gRPC proxy).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.trial import TrialState

from pipeline import paths, processes
from pipeline.config import TuneConfig
from pipeline.errors import UserError, first_line, redact

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER = "worker"  # trial user attr: the process running it (see processes.py)
GRPC = "grpc://"  # tune.storage through Optuna's gRPC storage proxy
HEARTBEAT = "pipeline:heartbeat"  # trial system attr: its last sign of life, where the storage has no heartbeats


def storage_url(cfg: TuneConfig) -> str:
    return cfg.storage or paths.default_optuna_storage()


def lock_url(cfg: TuneConfig) -> str:
    """Where the study lock lives: with the storage, or (a gRPC proxy has no lock of its own) in tune.lock, the
    PostgreSQL database behind the proxy."""
    url = storage_url(cfg)
    if not url.startswith(GRPC):
        return url
    if not (cfg.lock or "").startswith(("postgresql://", "postgres://", "postgresql+")):
        raise UserError(f"tune.storage {url}: a gRPC storage proxy has no lock of its own; set tune.lock to the "
                        "postgresql:// URL of the database behind it (its lock keeps the study at exactly n_trials)")
    return cfg.lock


def local_file(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a database server."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None if "://" in url else Path(url)


class StudyLock:
    """One process at a time, across every process and machine that can reach the storage.

    A local storage (SQLite, journal) gets a file lock beside its file; PostgreSQL
    a session advisory lock, which machines sharing the database share too.
    """

    def __init__(self, url: str, name: str = "schema"):
        self.url, self.name = url, name
        local = local_file(url)
        if local is not None:
            from filelock import FileLock

            self._file = FileLock(f"{local}.study-lock")  # not `.lock`: Optuna's journal takes that name itself
            self._engine = None
        elif url.startswith(("postgresql", "postgres")):
            import sqlalchemy

            self._file = None
            self._engine = sqlalchemy.create_engine(_sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
            self._key = int.from_bytes(hashlib.sha256(f"pipeline-study:{name}".encode()).digest()[:8], "big",
                                       signed=True)
            self._connection = None
        else:
            raise UserError(f"tune.storage {redact(url)!r}: use a SQLite URL, a postgresql:// URL or a journal "
                            "file path (other databases have no lock this pipeline can share across machines)")

    def __enter__(self) -> StudyLock:
        if self._file is not None:
            self._file.acquire()
        else:
            import sqlalchemy

            self._connection = self._engine.connect()
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.release()
        elif self._connection is not None:
            import sqlalchemy

            try:
                self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            finally:
                self._connection.close()
                self._connection = None


def _sqlalchemy_url(url: str) -> str:
    """postgresql:// as users copy it from docs means psycopg 3 here (SQLAlchemy 2.1 default); say so explicitly."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """An RDB URL (SQLite with a busy timeout, PostgreSQL) or a journal file path; the schema is created once,
    under the storage's lock, however many processes start at the same moment."""
    url = storage_url(cfg)
    if url.startswith(GRPC):
        return _grpc_proxy(url)
    local = local_file(url)
    if local is not None and not local.parent.is_dir():
        raise UserError(f"tune.storage: folder {local.parent} does not exist; create it or fix the path")
    try:
        with StudyLock(url):
            if "://" not in url:
                from optuna.storages.journal import JournalFileBackend

                return optuna.storages.JournalStorage(JournalFileBackend(str(local)))
            # SQLite writers wait for each other instead of failing with "database is locked". A server's
            # connections are shared by every worker of every machine: a worker needs one, its heartbeat another.
            engine = {"connect_args": {"timeout": 120}} if local else \
                {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
            return optuna.storages.RDBStorage(
                _sqlalchemy_url(url), engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    except ImportError as err:
        raise UserError(f"tune.storage {redact(url)}: database driver missing ({first_line(err)}); install it with "
                        "`pip install -e '.[postgres]'`") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors: unreachable server, bad credentials
        raise UserError(f"cannot open tune.storage {redact(url)}: {redact(first_line(err))}") from None


def _grpc_proxy(url: str) -> optuna.storages.BaseStorage:
    """Optuna's gRPC storage proxy at grpc://host:port: many workers, one database connection pool (the
    proxy's). It has no heartbeats: this pipeline's own (`HEARTBEAT`) stand in for them."""
    address = urlsplit(url)
    if not address.hostname or not address.port:
        raise UserError(f"tune.storage {url}: write a gRPC storage proxy as grpc://host:port")
    try:
        socket.create_connection((address.hostname, address.port), timeout=10).close()  # refused: say so at once
        proxy = optuna.storages.GrpcStorageProxy(host=address.hostname, port=address.port)
        proxy.wait_server_ready(timeout=30)
    except ImportError as err:
        raise UserError(f"tune.storage {url}: gRPC missing ({first_line(err)}); install it with "
                        "`pip install -e '.[grpc]'`") from None
    except Exception as err:  # noqa: BLE001 - not listening, not a proxy
        raise UserError(f"cannot reach the gRPC storage proxy at {url}: {first_line(err)}; start it with "
                        "optuna.storages.run_grpc_proxy_server (see README)") from None
    return proxy


def beat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """A sign of life of a running trial: an RDB heartbeat, or the `HEARTBEAT` time through a gRPC proxy."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.record_heartbeat(trial_id)
    elif isinstance(storage, optuna.storages.GrpcStorageProxy):
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


def counts(study: optuna.Study) -> tuple[int, list[optuna.trial.FrozenTrial], int]:
    """(finished trials, running trials, waiting trials)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    return finished, [t for t in trials if t.state == TrialState.RUNNING], \
        sum(t.state == TrialState.WAITING for t in trials)


def trial_id(storage: optuna.storages.BaseStorage, study_id: int, number: int) -> int:
    """A trial's id in its storage, through Optuna's public storage API (a `Trial` holds it only privately);
    `study_id`: `storage.get_study_id_from_name`, looked up once per process (`study.Search.study_id`)."""
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def fail(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a running trial, saying why; False if it had finished meanwhile."""
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    return storage.set_trial_state_values(trial_id, TrialState.FAIL)


def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, study_id: int, grace: float
                     ) -> None:
    """Fail (and retry) running trials whose process is gone: on this host by its pid, elsewhere by heartbeat."""
    optuna.storages.fail_stale_trials(study)  # RDB heartbeats; a no-op for the journal
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, last_beat = trial.user_attrs.get(OWNER, ""), trial.system_attrs.get(HEARTBEAT)
        silent = last_beat is not None and time.time() - last_beat > grace  # gRPC proxy: clocks agree within seconds
        # `trials.next_trial` names a trial's owner before it lets go of the lock this runs under: a running trial
        # without one was asked by a process stopped in between (Ctrl-C, SIGTERM, SIGKILL)
        orphan = OWNER not in trial.user_attrs
        if processes.is_dead(owner) or silent or orphan:
            reason = (f"no heartbeat for {grace}s" if silent else "its process stopped before it started"
                      if orphan else f"its process {owner} died")
            dead = trial_id(storage, study_id, trial.number)
            if fail(storage, dead, reason):
                retry(study, storage.get_trial(dead))
                print(f"[tune] trial {trial.number} FAIL     {reason}; queued for a retry", flush=True)


@contextlib.contextmanager
def heartbeats(storage: optuna.storages.BaseStorage, interval: float, running: set[int]):
    """Record heartbeats of the trials in `running` (this process's, by id) every `interval` seconds, on RDB
    storages and through a gRPC proxy, as `study.optimize` would."""
    if not isinstance(storage, (optuna.storages.RDBStorage, optuna.storages.GrpcStorageProxy)):
        yield
        return
    stop = threading.Event()

    def beating():
        while not stop.wait(interval):
            for each in list(running):
                with contextlib.suppress(Exception):  # a finished trial's last beat may race its tell
                    beat(storage, each)

    thread = threading.Thread(target=beating, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
