"""Processes: who holds a run or a trial open, whether that process still lives, and signals held off.

A SIGKILLed process cannot close what it opened. Runs and trials record the
identity of their process (host, pid and start time, so a recycled pid does not
pass for the dead one); any later process on the same host can then tell that
the owner is gone and close the orphan (MLflow runs, Optuna trials on storages
without heartbeats). Other hosts' orphans are left to heartbeats.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from typing import Any


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's or taskset's share; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host() -> str:
    """The name this machine goes by in owners: PIPELINE_HOSTNAME (for machines that share a hostname, e.g.
    containers), else the hostname."""
    return os.environ.get("PIPELINE_HOSTNAME") or socket.gethostname()


def identity(pid: int | None = None) -> str:
    """host:pid:start-time of a process (default: this one)."""
    import psutil

    process = psutil.Process(pid)
    return f"{host()}:{process.pid}:{process.create_time():.0f}"


def is_local(owner: str) -> bool:
    return owner.startswith(host() + ":")


def is_dead(owner: str) -> bool:
    """True only when `owner` ran on this host and has ended; unknown or remote owners are not judged."""
    import psutil

    if not owner or not is_local(owner):
        return False
    try:
        _, pid, _ = owner.rsplit(":", 2)
        # a killed child its parent has not reaped yet is a zombie: gone, though its pid still answers
        return identity(int(pid)) != owner or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return True


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM arriving inside the block takes effect as it ends, so what the block does happens whole
    or not at all (e.g. an epoch reaches every callback of a run or none: interrupted in between, tracking would
    keep an epoch the pruner never saw). Only the main thread receives signals; elsewhere the block runs as it is.
    """
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # None: a handler not set from Python, which could not be put back
        return
    arrived: list[tuple[int, Any]] = []
    for number in handlers:
        signal.signal(number, lambda *received: arrived.append(received))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number, frame in arrived[:1]:  # as it would have been received: the handler raises, or the default
            if callable(handlers[number]):
                handlers[number](number, frame)
            elif handlers[number] == signal.SIG_DFL:
                signal.raise_signal(number)
