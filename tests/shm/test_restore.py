"""Live migration's destination: entries and open files re-created under the nodeids and
fhs the source gave them (InodeTable.restore, HandleTable.restore), with the guest's
lookup counts; later inserts and opens go on without colliding with them."""

from __future__ import annotations

import dataclasses
import os

import pytest
from conftest import Tables
from realfds import Files

from shm_table import FUSE_ROOT_ID, ShmTableError

REG = 0o100644


def test_inodes_and_handles_keep_their_ids(tables: Tables, files: Files) -> None:
    src, dst = tables.inode(), tables.inode()
    hsrc, hdst = tables.handles(), tables.handles()
    nodeids = []
    for i in range(6):
        fd, ids = files.open(f"f{i}", os.O_PATH)
        nodeids.append(src.claim_or_insert(ids, None, 0, fd, REG, 1, f"f{i}")[0])
    src.claim_or_insert(files.ids("f0"), None, 0, -1, REG)  # a second lookup (by ids)
    src.forget(nodeids[1], 1)
    src.forget(nodeids[3], 1)
    fd, ids = files.open("late", os.O_PATH)
    nodeids.append(src.claim_or_insert(ids, None, 0, fd, REG, 1, "late")[0])  # reuses a slot
    fhs = [hsrc.open(nodeids[0], files.open("f0")[0], os.O_RDONLY) for _ in range(3)]
    hsrc.close(fhs[1])

    for e in sorted(src.iter_entries(), key=lambda e: e.slot):
        if e.nodeid != FUSE_ROOT_ID:
            fd, _ = files.open(e.name.decode(), os.O_PATH)
            dst.restore(dataclasses.replace(e, fd=fd))
    for h in sorted(hsrc.iter_handles(), key=lambda h: h.slot):
        hdst.restore(h.fh, h.nodeid, files.open("f0")[0], h.flags)
    dst.check()
    hdst.check()
    def view(t):  # noqa: ANN001, ANN202
        return {(e.nodeid, e.lookups, e.name, e.parent) for e in t.iter_entries()}
    assert view(dst) == view(src)
    assert dst.lookups(nodeids[0]) == 2
    assert {h.fh for h in hdst.iter_handles()} == {fhs[0], fhs[2]}
    pinned = dst.pin(nodeids[5])
    assert pinned is not None
    files.assert_names(pinned[1], files.ids("f5"))
    dst.unpin(nodeids[5])
    slot, fd = hdst.pin(fhs[2])
    files.assert_reads(fd, "f0")
    hdst.unpin(fhs[2])

    # what comes after the migration: new ids never name a restored one
    fd, ids = files.open("new", os.O_PATH)
    new = dst.claim_or_insert(ids, None, 0, fd, REG, 1, "new")[0]
    assert new not in {e.nodeid for e in src.iter_entries()}
    fh = hdst.open(new, files.open("new")[0], os.O_RDONLY)
    assert fh not in {fhs[0], fhs[2]}
    dst.check()
    hdst.check()


def test_restore_refuses_a_taken_or_earlier_slot(tables: Tables, files: Files) -> None:
    src, dst = tables.inode(), tables.inode()
    fd, ids = files.open("a", os.O_PATH)
    nodeid = src.claim_or_insert(ids, None, 0, fd, REG, 1, "a")[0]
    e = src.get(nodeid)
    assert e is not None
    fd2, _ = files.open("a", os.O_PATH)
    dst.restore(dataclasses.replace(e, fd=fd2))
    with pytest.raises(ShmTableError):
        dst.restore(dataclasses.replace(e, fd=-1))
    with pytest.raises(ValueError):
        dst.restore(dataclasses.replace(e, nodeid=5 << 32 | 9, lookups=0, fd=-1))
    hd = tables.handles()
    with pytest.raises(ValueError):
        hd.restore(3 << 32 | 1, nodeid, -1, 0)  # an odd generation is never an fh
    dst.check()
