"""Shared-memory tables for pyvirtiofsd: the inode store and the open-file table.

Both live in POSIX shared memory so every queue worker (cloned with CLONE_FILES) sees the same
nodeids, fh values, lookup counts, pins and fd numbers.  See docs/shm_table.md.
"""

from shm_table.handles import DEFAULT_HANDLE_CAPACITY, HandleEntry, HandleTable
from shm_table.table import (
    DEFAULT_INODE_CAPACITY,
    FUSE_ROOT_ID,
    MAX_HANDLE_SZ,
    NAME_MAX,
    HandleNotFound,
    HandleTableFull,
    InodeEntry,
    InodeIds,
    InodeNotFound,
    InodeTable,
    InodeTableFull,
    NotPinned,
    PinsExhausted,
    SegmentInUse,
    SegmentLayoutError,
    ShmTableError,
    StrongRef,
    TableCorrupt,
)

__all__ = [
    "DEFAULT_HANDLE_CAPACITY",
    "DEFAULT_INODE_CAPACITY",
    "FUSE_ROOT_ID",
    "MAX_HANDLE_SZ",
    "NAME_MAX",
    "HandleEntry",
    "HandleNotFound",
    "HandleTable",
    "HandleTableFull",
    "InodeEntry",
    "InodeIds",
    "InodeNotFound",
    "InodeTable",
    "InodeTableFull",
    "NotPinned",
    "PinsExhausted",
    "SegmentInUse",
    "SegmentLayoutError",
    "ShmTableError",
    "StrongRef",
    "TableCorrupt",
]
