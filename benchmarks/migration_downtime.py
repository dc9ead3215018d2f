"""How long live migration's stopped phase takes for the device state: a guest (the test
front-end) looks up N files in nested directories and opens some, then the time from the
source's SET_DEVICE_STATE_FD(save) to its CHECK_DEVICE_STATE answer (the state written
into the pipe), and from the destination's SET_DEVICE_STATE_FD(load) to its
CHECK_DEVICE_STATE answer (the tables re-created), as QEMU drives them while the guest is
stopped. The source's logging starts before (SET_FEATURES with LOG_ALL), as in a real
migration, and the paths the daemon collects meanwhile (the pre-copy) are not counted.

    python3 -m benchmarks.migration_downtime [--inodes 3000] [--open 50] [--runs 5]
        [--mode find-paths|file-handles]

Each run starts fresh daemons of the tree this file is run from; to compare two trees,
run it (with tests/protocol/test_migration_paths.py beside it) from each in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.protocol.test_migration_paths import connect, start_logging, wait_collected
from tests.support.daemon import start_pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon

R = vu.Request
SAVE, LOAD = 0, 1
QUEUE = 8192  # the test front-end does not recycle chains: room for every request


def make_tree(share: Path, inodes: int) -> list[tuple[str, str]]:
    """inodes files and directories: 30 directories of files."""
    names = []
    per_dir = max(1, inodes // 30)
    d = 0
    while len(names) < inodes:
        dname = f"d{d:03d}"
        (share / dname).mkdir(exist_ok=True)
        names.append(("", dname))
        for i in range(min(per_dir - 1, inodes - len(names))):
            (share / dname / f"f{i:05d}").write_bytes(b"x" * 64)
            names.append((dname, f"f{i:05d}"))
        d += 1
    return names


def timed_transfer(fe: Frontend, direction: int, blob: bytes = b"") -> tuple[float, bytes]:
    """Seconds from SET_DEVICE_STATE_FD to CHECK_DEVICE_STATE's answer, and the state."""
    r, w = os.pipe()
    theirs, ours = (w, r) if direction == SAVE else (r, w)
    t0 = time.perf_counter()
    fe.call(R.SET_DEVICE_STATE_FD, vu.DEVICE_STATE.pack(direction, 0), [theirs])
    os.close(theirs)
    got = b""
    if direction == SAVE:
        while chunk := os.read(ours, 1 << 20):
            got += chunk
        os.close(ours)
    else:
        view = memoryview(blob)
        while view:
            view = view[os.write(ours, view):]
        os.close(ours)
    result = vu.decode_u64(fe.call(R.CHECK_DEVICE_STATE))
    elapsed = time.perf_counter() - t0
    assert result == 0, "transfer failed"
    return elapsed, got


def one_run(base: Path, names: list[tuple[str, str]], n_open: int,
            extra: tuple[str, ...]) -> tuple[float, float, int]:
    share = base / "share"
    src = start_pyvirtiofsd(share, base / "a.sock", *extra)
    dst = None
    try:
        fe = connect(base / "a.sock", 2, QUEUE)
        fe.init()
        ids: dict[str, int] = {"": 1}
        opened = 0
        for parent, name in names:
            err, entry = fe.lookup(ids[parent], name.encode())
            assert err == 0
            nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
            ids[name if not parent else f"{parent}/{name}"] = nodeid
            if parent and opened < n_open:
                err, _ = fe.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
                assert err == 0
                opened += 1
        start_logging(fe)
        if "file-handles" not in extra:  # the pre-copy: the daemon collects paths
            wait_collected(src, 3, must=False)  # (a daemon before that collected none)
        for index in fe.rings:
            fe.call(R.GET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
        save_s, blob = timed_transfer(fe, SAVE)
        dst = start_pyvirtiofsd(share, base / "b.sock", *extra)
        fe2 = connect(base / "b.sock", 0, QUEUE)
        load_s, _ = timed_transfer(fe2, LOAD, blob)
        fe2.close()
        fe.close()
        return save_s, load_s, len(blob)
    finally:
        stop_daemon(src)
        if dst is not None:
            stop_daemon(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inodes", type=int, default=3000)
    p.add_argument("--open", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mode", default="find-paths")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "share").mkdir()
        names = make_tree(base / "share", args.inodes)
        saves, loads = [], []
        for _ in range(args.runs):
            s, ld, size = one_run(base, names, args.open, ("--migration-mode", args.mode))
            saves.append(s * 1000)
            loads.append(ld * 1000)
        print(f"{args.inodes} inodes, {args.open} open files, {args.mode}, state {size} "
              f"bytes, {args.runs} runs (median, min ms): save {statistics.median(saves):.1f}"
              f" {min(saves):.1f}, load {statistics.median(loads):.1f} {min(loads):.1f}, "
              f"total {statistics.median(saves) + statistics.median(loads):.1f}")


if __name__ == "__main__":
    main()
