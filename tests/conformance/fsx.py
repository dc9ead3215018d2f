"""fsx-style data-integrity exerciser (runs INSIDE the guest; standard library only).

A seeded sequence of random operations on one file -- write at a random offset and length,
truncate (shrink and extend), punch hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)``), extend with
``posix_fallocate``, write through a shared ``mmap``, read back -- each mirrored in an
in-memory model of the file.  Every read (and a full-file comparison every
:data:`CHECK_EVERY` operations, after ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``)
is compared with the model.  Output, one item a line::

    fsx.ops <n>
    fsx.mmap ok|<errno name>          (ENODEV when the mount refuses shared mmaps)
    fsx.punch_hole ok|<errno name>
    fsx.mismatch <op#> <what> ...      (at most 20 of them)
    fsx.mismatches <n>
    fsx.end

Usage: ``python3 fsx.py DIR [--ops N] [--seed S]`` (also run through ``posix_suite.py --fsx``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import sys

MAX_LEN = 256 * 1024  # the file never grows beyond this
MAX_OP = 32 * 1024  # longest write/read/punch
CHECK_EVERY = 200
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


class Fsx:
    def __init__(self, path: str, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.mismatches = 0
        self.reported = 0
        self.op = 0
        self.mmap_ok = self._probe_mmap()
        self.punch_ok = self._probe_punch()

    def _probe_mmap(self) -> str:
        os.ftruncate(self.fd, 4096)
        try:
            m = mmap.mmap(self.fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m.close()
            return "ok"
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))
        finally:
            os.ftruncate(self.fd, 0)

    def _probe_punch(self) -> str:
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
            return "ok"
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))

    def mismatch(self, what: str) -> None:
        self.mismatches += 1
        if self.reported < 20:
            self.reported += 1
            print(f"fsx.mismatch {self.op} {what}", flush=True)

    def compare(self, offset: int, data: bytes, how: str) -> None:
        want = bytes(self.model[offset : offset + len(data)])
        if data != want:
            first = next((i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b),
                         min(len(data), len(want)))
            self.mismatch(f"{how} off={offset} len={len(data)} want_len={len(want)} "
                          f"first_diff_at={offset + first}")

    def do_write(self) -> None:
        off = self.rng.randrange(0, MAX_LEN)
        length = self.rng.randrange(1, min(MAX_OP, MAX_LEN - off) + 1)
        data = self.rng.randbytes(length)
        os.pwrite(self.fd, data, off)
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + length] = data

    def do_truncate(self) -> None:
        size = self.rng.randrange(0, MAX_LEN + 1)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def do_punch(self) -> None:
        if not self.model or self.punch_ok != "ok":
            return self.do_write()
        off = self.rng.randrange(0, len(self.model))
        length = self.rng.randrange(1, MAX_OP + 1)
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        end = min(off + length, len(self.model))
        self.model[off:end] = bytes(end - off)

    def do_fallocate(self) -> None:
        off = self.rng.randrange(0, MAX_LEN)
        length = self.rng.randrange(1, min(MAX_OP, MAX_LEN - off) + 1)
        os.posix_fallocate(self.fd, off, length)
        if off + length > len(self.model):
            self.model.extend(bytes(off + length - len(self.model)))

    def do_mmap_write(self) -> None:
        if len(self.model) == 0 or self.mmap_ok != "ok":
            return self.do_write()
        size = len(self.model)
        off = self.rng.randrange(0, size)
        length = self.rng.randrange(1, min(MAX_OP, size - off) + 1)
        data = self.rng.randbytes(length)
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            m[off : off + length] = data
            if self.rng.random() < 0.5:
                m.flush()
        finally:
            m.close()
        self.model[off : off + length] = data

    def do_mmap_read(self) -> None:
        if len(self.model) == 0 or self.mmap_ok != "ok":
            return self.do_read()
        size = len(self.model)
        off = self.rng.randrange(0, size)
        length = self.rng.randrange(1, min(MAX_OP, size - off) + 1)
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            data = m[off : off + length]
        finally:
            m.close()
        self.compare(off, data, "mmap-read")

    def do_read(self) -> None:
        off = self.rng.randrange(0, MAX_LEN)
        length = self.rng.randrange(1, MAX_OP + 1)
        self.compare(off, os.pread(self.fd, length, off), "read")

    def check_all(self, how: str) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.mismatch(f"{how} size={size} want={len(self.model)}")
        self.compare(0, os.pread(self.fd, MAX_LEN + MAX_OP, 0), how)

    def run(self, ops: int) -> None:
        table = [
            (self.do_write, 30), (self.do_read, 20), (self.do_truncate, 8),
            (self.do_punch, 10), (self.do_fallocate, 5), (self.do_mmap_write, 15),
            (self.do_mmap_read, 12),
        ]  # fmt: skip
        funcs = [f for f, _ in table]
        weights = [w for _, w in table]
        for self.op in range(1, ops + 1):
            fn = self.rng.choices(funcs, weights)[0]
            try:
                fn()
            except OSError as e:
                self.mismatch(f"{fn.__name__} raised {errno.errorcode.get(e.errno or 0)}")
            if self.op % CHECK_EVERY == 0:
                self.check_all("check")
                _drop_caches()
                self.check_all("after-drop-caches")
                # a fresh descriptor sees the same bytes
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_RDWR)
        self.check_all("final")
        os.close(self.fd)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    fsx = Fsx(os.path.join(args.dir, "fsx.bin"), args.seed)
    print(f"fsx.mmap {fsx.mmap_ok}", flush=True)
    print(f"fsx.punch_hole {fsx.punch_ok}", flush=True)
    fsx.run(args.ops)
    print(f"fsx.ops {args.ops}", flush=True)
    print(f"fsx.mismatches {fsx.mismatches}", flush=True)
    print("fsx.end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
