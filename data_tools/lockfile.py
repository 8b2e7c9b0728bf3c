"""A lock that is a file, for processes on many nodes sharing one file system (the converter's parts and merges).

Why a file and not ``flock``/``fcntl`` locks: on parallel file systems those are missing
(Lustre mounted without ``flock`` answers ``ENOSYS``) or silently local to one node
(Lustre's ``localflock``, BeeGFS by default), whereas creating a hard link is atomic on
every POSIX file system, NFS included: it fails when the name exists.

The lock file holds a random token. It is created complete (written under a private
name, then ``os.link``-ed to the lock's name) and removed only by compare-and-delete on
a token (``_compare_and_delete``): the holder releases only a lock that still holds its
own token, and a waiter takes over only the lock whose token it saw go stale, so neither
can remove a live holder's lock. The holder refreshes the lock's mtime every
``HEARTBEAT_S``; a lock not refreshed for ``STALE_S`` (its holder was killed) is taken
over. In the instant a lock is moved aside to be checked, a third process may create a
new one, and two processes then hold the lock: the converter writes everything with
atomic renames of identical content, so this costs work, never correctness.

Standard library only, like ``manifest`` (which uses it and the training stream imports).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

POLL_S = 1.0
HEARTBEAT_S = 15.0
STALE_S = 120.0
log = logging.getLogger(__name__)


@contextlib.contextmanager
def hold(lock: Path, give_up: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Hold ``lock`` for the ``with`` block, waiting for it; yields True, or False (not held) once ``give_up()``.

    ``give_up`` is asked before each try: a planner stops waiting once the plan exists.
    """
    token = secrets.token_hex(8)
    while True:
        if give_up():
            yield False
            return
        if _acquire(lock, token):
            break
        _take_over_if_stale(lock)
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, token, stop), daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        _compare_and_delete(lock, token, if_stale=False)


def _acquire(lock: Path, token: str) -> bool:
    """Create ``lock`` holding ``token``, complete from its first instant; False when another process holds it.

    An ``EEXIST`` for a lock that holds our token is success: NFS may answer a
    retransmitted link that way. A waiter only looks while the lock exists, so
    polling costs one metadata lookup, not a file creation.
    """
    if lock.exists():
        return False
    mine = lock.with_name(f"{lock.name}.{token}")
    mine.write_text(f"{token} {socket.gethostname()} pid {os.getpid()}\n")
    try:
        os.link(mine, lock)
    except FileExistsError:
        return token_of(lock) == token
    finally:
        mine.unlink()
    return True


def token_of(lock: Path) -> str:
    """The token a lock file holds ('' when it is gone or empty)."""
    try:
        words = lock.read_text().split()
    except FileNotFoundError:
        return ""
    return words[0] if words else ""


def _compare_and_delete(lock: Path, token: str, *, if_stale: bool) -> bool:
    """Delete ``lock`` only if it holds ``token`` (and, with ``if_stale``, was not refreshed for ``STALE_S``).

    POSIX has no compare-and-delete; it is built from an atomic rename: the lock is moved
    to a name only this call uses, checked there, and linked back when it is not the one
    expected (``os.link`` fails if a new holder took the name meanwhile, so no lock is
    ever overwritten).
    """
    moved = lock.with_name(f"{lock.name}.{secrets.token_hex(8)}.check")
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return False
    expected = token_of(moved) == token and (not if_stale or time.time() - moved.stat().st_mtime > STALE_S)
    if not expected:
        with contextlib.suppress(FileExistsError):
            os.link(moved, lock)
    moved.unlink()
    return expected


def _heartbeat(lock: Path, token: str, stop: threading.Event) -> None:
    """Refresh the lock's mtime while it holds ``token``: never keep a lock taken over by another process alive."""
    while not stop.wait(HEARTBEAT_S):
        if token_of(lock) == token:
            with contextlib.suppress(FileNotFoundError):
                os.utime(lock)


def _take_over_if_stale(lock: Path) -> None:
    """Remove ``lock`` when its holder stopped refreshing it (killed while holding it), and only that lock."""
    try:
        age = time.time() - lock.stat().st_mtime
        if age <= STALE_S:
            return
        holder = lock.read_text().strip()
    except FileNotFoundError:
        return
    if _compare_and_delete(lock, holder.split()[0] if holder else "", if_stale=True):
        log.warning("lock %s (%s) not refreshed for %.0f s: its holder is gone, taking it over", lock, holder, age)
