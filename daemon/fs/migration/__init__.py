"""Live migration's device state: the inode and open-file tables (``state.py`` saves them,
``find.py`` finds them again on the destination), the paths collected while the guest
runs (``paths.py``) and the guest's host locks (``locks.py``)."""

from __future__ import annotations

from daemon.fs.migration import locks
from daemon.fs.migration.find import load_state
from daemon.fs.migration.locks import HeldLocks
from daemon.fs.migration.paths import PathCollector
from daemon.fs.migration.state import (
    FORMAT,
    MAX_STATE,
    VERSION,
    MigrationError,
    MigrationOptions,
    inode_records,
    save_state,
)
from daemon.fs.passthrough import PassthroughFs

__all__ = ["FORMAT", "MAX_STATE", "VERSION", "HeldLocks", "MigrationError",
           "MigrationOptions", "PathCollector", "hand_over_state", "inode_records",
           "load_state", "locks", "save_state"]


def hand_over_state(fs: PassthroughFs, options: MigrationOptions,
                    collector: PathCollector | None = None,
                    parked: dict[int, list[list[int]]] | None = None,
                    ) -> tuple[bytes, HeldLocks]:
    """The source's switch-over: the state, and the locks it let go of for the destination
    to take (:func:`locks.take_back` them if the migration fails). ``collector``: the
    paths gathered since logging started; ``parked``: the SETLKWs each queue's stopped
    worker was waiting with."""
    held = locks.collect(fs)
    blob = save_state(fs, options, held, collector, parked)
    locks.hand_over(fs, held)
    return blob, held
