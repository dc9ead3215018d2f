"""The options of virtiofsd that change how the file system answers requests (set from
the command line in supervisor.py)."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.fs.idmap import IdMap
from daemon.fs.xattrmap import XattrMap


@dataclass(slots=True)
class Config:
    """Options of virtiofsd that change how requests are answered."""

    cache: str = "auto"
    readdirplus: bool = True
    writeback: bool = False
    allow_direct_io: bool = False
    preserve_noatime: bool = False
    announce_submounts: bool = True
    readonly: bool = False
    file_handles: str = "prefer"  # never | prefer | mandatory
    xattr: bool = False
    fd_cache_size: int = 1024  # per worker, for inodes the table keeps by handle only
    # forward fcntl locks to the host, on a description per guest lock owner (as POSIX
    # wants; daemon/fs/lock_owners.py)
    posix_lock: bool = False
    flock: bool = True  # forward flock() to the host
    uid_map: IdMap | None = None  # --translate-uid
    gid_map: IdMap | None = None  # --translate-gid
    xattrmap: XattrMap | None = None  # --xattrmap
    posix_acl: bool = False  # --posix-acl
    security_label: bool = False  # --security-label
    killpriv_v2: bool = False  # --killpriv-v2
    allow_mmap: bool = False  # --allow-mmap

    @property
    def timeout(self) -> tuple[int, int]:
        return {"never": (0, 0), "auto": (1, 0)}.get(self.cache, (86400, 0))
