"""What the guest holds, as the kernel would keep it: nodeids with their lookup counts and
the inode each names, open file handles, and where on the host each lives (when known)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from daemon.protocol import fuse

ROOT = fuse.ROOT_ID
ATTR_AT = fuse.ENTRY_HEAD.size  # the fuse_attr inside an entry_out
ENTRY = fuse.ENTRY_OUT_SIZE


@dataclass
class Node:
    nodeid: int
    count: int
    ino: int
    mode: int
    path: str | None  # relative to the share ("" = the share); None once unsure
    uid: int = 0


@dataclass
class Handle:
    fh: int
    nodeid: int
    ino: int
    is_dir: bool
    path: str | None
    flags: int = 0
    opcode: int = fuse.Opcode.OPEN  # the request that opened it (OPEN, OPENDIR, CREATE, TMPFILE)


@dataclass
class Model:
    root_ino: int
    nodes: dict[int, Node] = field(default_factory=dict)
    handles: dict[int, Handle] = field(default_factory=dict)
    ambiguous: set[int] = field(default_factory=set)  # counts unknowable: never checked
    dead: list[int] = field(default_factory=list)  # forgotten nodeids, for stale requests
    released: list[int] = field(default_factory=list)  # released fhs

    def __post_init__(self) -> None:
        self.nodes[ROOT] = Node(ROOT, 1 << 62, self.root_ino, stat.S_IFDIR | 0o755, "")

    def node(self, nodeid: int) -> Node | None:
        return self.nodes.get(nodeid)

    def held(self) -> list[int]:
        return sorted(self.nodes)

    def add_lookup(self, nodeid: int, ino: int, mode: int, path: str | None,
                   uid: int = 0) -> Node:
        """A reply that hands the guest one more reference to nodeid."""
        node = self.nodes.get(nodeid)
        if node is None:
            node = self.nodes[nodeid] = Node(nodeid, 0, ino, mode, path, uid)
        elif node.path != path:
            node.path = None if node.path is not None and path is not None else (
                node.path or path)
        node.count += 1
        return node

    def forget(self, nodeid: int, n: int) -> bool:
        """The guest gives n references back; True if that is more than it held."""
        if nodeid == ROOT:
            return False
        node = self.nodes.get(nodeid)
        if node is None:
            return n > 0
        if n >= node.count:
            del self.nodes[nodeid]
            self.dead.append(nodeid)
            return n > node.count
        node.count -= n
        return False

    def make_ambiguous(self, nodeid: int) -> None:
        if nodeid != ROOT:
            self.nodes.pop(nodeid, None)
            self.ambiguous.add(nodeid)

    def forget_everything(self) -> None:
        """After DESTROY: the guest holds nothing but the root."""
        for nodeid in list(self.nodes):
            if nodeid != ROOT:
                self.dead.append(nodeid)
                del self.nodes[nodeid]
        self.released.extend(self.handles)
        self.handles.clear()

    def invalidate_paths(self, rel: str) -> None:
        """A rename, unlink or rmdir touched ``rel``: paths at or under it are unsure."""
        for node in self.nodes.values():
            if node.path is not None and node.nodeid != ROOT and (
                    node.path == rel or node.path.startswith(rel + "/")):
                node.path = None
        for h in self.handles.values():
            if h.path is not None and (h.path == rel or h.path.startswith(rel + "/")):
                h.path = None


def join(parent: str | None, name: bytes) -> str | None:
    if parent is None:
        return None
    text = os.fsdecode(name)  # any bytes (surrogateescape), as the host path takes them
    return f"{parent}/{text}" if parent else text


def parse_entry(payload: bytes, offset: int = 0) -> tuple[int, int, int, int, int]:
    """(nodeid, ino, mode, uid, gid) of an entry_out."""
    nodeid = int.from_bytes(payload[offset : offset + 8], "little")
    attr = fuse.ATTR.unpack_from(payload, offset + ATTR_AT)
    return nodeid, attr[0], attr[9], attr[11], attr[12]


def parse_direntplus(payload: bytes) -> list[tuple[bytes, int, int, int]]:
    """(name, nodeid, ino, mode) of each direntplus."""
    out = []
    pos = 0
    while pos + ENTRY + fuse.DIRENT_HEAD.size <= len(payload):
        nodeid, ino, mode, _, _ = parse_entry(payload, pos)
        d_ino, _off, namelen, _type = fuse.DIRENT_HEAD.unpack_from(payload, pos + ENTRY)
        start = pos + ENTRY + fuse.DIRENT_HEAD.size
        name = payload[start : start + namelen]
        out.append((name, nodeid, ino if nodeid else d_ino, mode))
        pos += fuse.direntplus_size(namelen)
    return out


def parse_dirents(payload: bytes) -> list[tuple[bytes, int]]:
    """(name, ino) of each dirent."""
    out = []
    pos = 0
    while pos + fuse.DIRENT_HEAD.size <= len(payload):
        ino, _off, namelen, _type = fuse.DIRENT_HEAD.unpack_from(payload, pos)
        start = pos + fuse.DIRENT_HEAD.size
        out.append((payload[start : start + namelen], ino))
        pos += fuse.dirent_size(namelen)
    return out
