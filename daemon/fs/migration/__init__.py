"""Live migration's device state: the inode and open-file tables (``state.py``) and the
guest's host locks (``locks.py``), saved by the source at the switch-over and loaded by
the destination before the guest runs again."""

from __future__ import annotations

from daemon.fs.migration import locks
from daemon.fs.migration.locks import HeldLocks
from daemon.fs.migration.state import (
    FORMAT,
    MAX_STATE,
    VERSION,
    MigrationError,
    MigrationOptions,
    load_state,
    save_state,
)
from daemon.fs.passthrough import PassthroughFs

__all__ = ["FORMAT", "MAX_STATE", "VERSION", "HeldLocks", "MigrationError",
           "MigrationOptions", "hand_over_state", "load_state", "locks", "save_state"]


def hand_over_state(fs: PassthroughFs, options: MigrationOptions) -> tuple[bytes, HeldLocks]:
    """The source's switch-over: the state, and the locks it let go of for the destination
    to take (:func:`locks.take_back` them if the migration fails)."""
    held = locks.collect(fs)
    blob = save_state(fs, options, held)
    locks.hand_over(fs, held)
    return blob, held
