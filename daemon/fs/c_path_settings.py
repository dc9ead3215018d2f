"""What the C fast path must know of a file system to answer requests as it would: a
read-only snapshot the file system hands out (``PassthroughFs.c_path_settings()``), so
the worker that builds the C context (``workers/fast_path.py``) needs none of its private
fields."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.protocol.opcodes import Condition


@dataclass(frozen=True, slots=True)
class CPathSettings:
    """Settings the C answers depend on; taken after ``add_root`` (mount fd, handles)."""

    conditions: frozenset[Condition]  # which of the table's declining conditions hold
    timeout: tuple[int, int]  # entry and attribute timeout (seconds, nanoseconds)
    negative_lookup: bool  # a missing name gets a negative entry (not ENOENT)
    use_handles: bool  # inodes are identified by file handle
    mandatory_handles: bool  # --inode-file-handles=mandatory
    root_mnt_id: int
    mount_fd: int  # for open_by_handle_at
    create_open_clear: int  # open flags a plain CREATE strips before its open(2)
    create_reply_flags: int  # FOPEN_* flags of a CREATE's reply
    own_ids: tuple[int, int]  # the daemon's uid and gid, restored after acting as a caller
