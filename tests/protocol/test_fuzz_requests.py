"""Random FUSE requests from a hostile guest, on the high-priority queue (which the worker
template serves, workers/template/hiprio.py) and two request queues at once.

Each seed sends a few thousand requests built from every opcode the daemon knows and some
it does not, with argument structs that are sometimes well formed, sometimes random,
truncated or padded, names that are missing their NUL, contain '/', are '.', '..' or
too long, nodeids and file handles that are real, forged or already released, and other
callers' uids. They go to the C fast path and to Python alike.

What the guest must see, request by request: a reply to every request that has one (a
used element as long as the reply's own header says, for the request it was sent as,
with an errno in range), and no reply to FORGET and BATCH_FORGET. Afterwards: the daemon
and the same workers are alive and serve LOOKUP + READ of a known file on every queue,
nothing beside the share changed, and the log has no traceback (an exception the daemon
did not expect is a bug even when it is answered EIO).

SETLKW is left out (a blocking lock may wait for ever, as it may for a real guest), and
lengths that would make the host allocate or copy gigabytes are kept small.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import KNOWN, KNOWN_DATA, Served, serve
from tests.support.frontend import F_INDIRECT, F_NEXT, F_WRITE, GUEST_BASE

O = fuse.Opcode  # noqa: E741 - short, used in every builder
NO_REPLY = {O.FORGET, O.BATCH_FORGET}
MAYBE_NO_REPLY = {O.INTERRUPT, O.NOTIFY_REPLY}  # answered or dropped, never a hang
UNKNOWN_OPCODES = [0, 7, 19, 52, 99, 4096, 0xFFFFFFFF]
OUT_ROOM = 65536 + 4096
READ_ROOM = 16384 + 4096
REQUESTS_PER_SEED = 2500
# a guest may send anything on queue 0 too, where the template answers clone requests
# between its chains
QUEUES = (0, 1, 2)

NAMES = [KNOWN, b"d", b"escape", b"new", b"new2", b".", b"..", b"a/b", b"/etc", b"",
         b"x" * 255, b"y" * 256, b"z" * 4000, b"\xff\xfe", b"..\0hidden", b"sub"]


def outside_snapshot(base: Path, share: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under base that is not the share or the daemon's socket and log, with
    its mode, size and (for files) contents."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for root, dirs, files in os.walk(base):
        if Path(root) == share or share in Path(root).parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            p = Path(root) / name
            if p == share or p.name.startswith("vu.sock"):
                continue
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p)] = (st.st_mode, st.st_size, data)
    return out


class Fuzzer:
    def __init__(self, srv: Served, seed: int) -> None:
        self.srv = srv
        self.rng = random.Random(seed)
        self.nodeids = [fuse.ROOT_ID]
        self.fhs: list[int] = []
        self.unique_of_last = 0
        # buffers reused by every request (the test front-end's allocator never frees)
        fe = srv.fe
        self.bufs = {q: (fe.alloc(READ_ROOM), fe.alloc(READ_ROOM), fe.alloc(OUT_ROOM))
                     for q in QUEUES}

    # ----- value pools -----------------------------------------------------------

    def u64(self) -> int:
        r = self.rng
        return r.choice([0, 1, 2, 3, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
                         (1 << 64) - 1, r.getrandbits(64), r.getrandbits(16)])

    def u32(self) -> int:
        r = self.rng
        return r.choice([0, 1, 0o777, 0o100644, 0o40755, 0o20644, 0xFFFF, 0x7FFFFFFF,
                         0xFFFFFFFF, r.getrandbits(32), r.getrandbits(8)])

    def nodeid(self) -> int:
        r = self.rng
        return r.choice(self.nodeids) if r.random() < 0.8 else self.u64()

    def fh(self) -> int:
        r = self.rng
        if self.fhs and r.random() < 0.7:
            return r.choice(self.fhs)
        return self.u64()

    def small(self, limit: int = 1 << 20) -> int:
        return self.rng.choice([0, 1, 4095, 4096, 65536, self.rng.randrange(limit)])

    def offset(self) -> int:
        return self.rng.choice([0, 4096, 1 << 30, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
                                self.rng.getrandbits(20)])

    def name(self) -> bytes:
        r = self.rng
        n = r.choice(NAMES)
        return n if r.random() < 0.1 else n + b"\0"

    # ----- argument builders -----------------------------------------------------

    def fixed(self, st: struct.Struct, *fields: int) -> bytes:
        return st.pack(*fields) if self.rng.random() < 0.8 else self.rng.randbytes(st.size)

    def build(self, op: int) -> bytes:
        r = self.rng
        u32, u64, fh, small, off = self.u32, self.u64, self.fh, self.small, self.offset
        builders: dict[int, Callable[[], bytes]] = {
            O.LOOKUP: self.name,
            O.FORGET: lambda: self.fixed(fuse.FORGET_IN, r.choice([1, 2, u64()])),
            O.GETATTR: lambda: self.fixed(fuse.GETATTR_IN, r.choice([0, 1]), 0, fh()),
            O.SETATTR: lambda: self.fixed(
                fuse.SETATTR_IN, u32(), 0, fh(), off(), u64(), u64(), u64(), u64(),
                u32(), u32(), u32(), u32(), u32(), u32(), u32(), u32()),
            O.READLINK: lambda: b"",
            O.SYMLINK: lambda: self.name() + r.choice([b"/etc/passwd\0", b"../outside\0",
                                                       b"known.txt\0", b"x"]),
            O.MKNOD: lambda: self.fixed(fuse.MKNOD_IN, u32(), u32(), 0o022, 0) + self.name(),
            O.MKDIR: lambda: self.fixed(fuse.MKDIR_IN, u32(), 0o022) + self.name(),
            O.UNLINK: self.name,
            O.RMDIR: self.name,
            O.RENAME: lambda: self.fixed(fuse.RENAME_IN, self.nodeid()) + self.name()
            + self.name(),
            O.RENAME2: lambda: struct.pack("<QII", self.nodeid(), r.choice([0, 1, 2, 4,
                                                                           u32()]), 0)
            + self.name() + self.name(),
            O.LINK: lambda: self.fixed(fuse.LINK_IN, self.nodeid()) + self.name(),
            O.OPEN: lambda: self.fixed(fuse.OPEN_IN, r.choice([0, 1, 2, 0o1000, u32()]), 0),
            O.READ: lambda: self.fixed(fuse.READ_IN, fh(), off(), small(1 << 17), 0, u64(),
                                       0, 0),
            O.WRITE: lambda: self.write_arg(),
            O.STATFS: lambda: b"",
            O.RELEASE: lambda: self.fixed(fuse.RELEASE_IN, fh(), u32(), u32(), u64()),
            O.FSYNC: lambda: self.fixed(fuse.FSYNC_IN, fh(), u32(), 0),
            O.SETXATTR: lambda: self.fixed(fuse.SETXATTR_IN_COMPAT, small(300), u32())
            + r.choice([b"user.x\0", b"trusted.y\0", b"security.capability\0", b"\0",
                        b"user."]) + r.randbytes(r.randrange(64)),
            O.GETXATTR: lambda: self.fixed(fuse.GETXATTR_IN, small(1 << 17), 0)
            + r.choice([b"user.x\0", b"system.posix_acl_access\0", b"", b"a" * 300 + b"\0"]),
            O.LISTXATTR: lambda: self.fixed(fuse.GETXATTR_IN, small(1 << 17), 0),
            O.REMOVEXATTR: lambda: r.choice([b"user.x\0", b"\0", b"user.x"]),
            O.FLUSH: lambda: self.fixed(fuse.FLUSH_IN, fh(), 0, 0, u64()),
            O.OPENDIR: lambda: self.fixed(fuse.OPEN_IN, r.choice([0, u32()]), 0),
            O.READDIR: lambda: self.fixed(fuse.READ_IN, fh(), off(), small(1 << 17), 0, 0,
                                          0, 0),
            O.READDIRPLUS: lambda: self.fixed(fuse.READ_IN, fh(), off(), small(1 << 17), 0,
                                              0, 0, 0),
            O.RELEASEDIR: lambda: self.fixed(fuse.RELEASE_IN, fh(), 0, 0, 0),
            O.FSYNCDIR: lambda: self.fixed(fuse.FSYNC_IN, fh(), u32(), 0),
            O.GETLK: lambda: self.lock_arg(),
            O.SETLK: lambda: self.lock_arg(),
            O.ACCESS: lambda: self.fixed(fuse.ACCESS_IN, r.choice([0, 1, 2, 4, 7, u32()]), 0),
            O.CREATE: lambda: self.fixed(fuse.CREATE_IN, r.choice([0o101, 0o301, 2, u32()]),
                                         u32(), 0o022, 0) + self.name(),
            O.INTERRUPT: lambda: self.fixed(fuse.INTERRUPT_IN, r.choice(
                [self.unique_of_last, u64()])),
            O.BATCH_FORGET: lambda: self.batch_forget_arg(),
            O.FALLOCATE: lambda: self.fixed(fuse.FALLOCATE_IN, fh(), small(), small(),
                                            r.choice([0, 1, 2, 3, 0x10, u32()]), 0),
            O.LSEEK: lambda: self.fixed(fuse.LSEEK_IN, fh(), off(),
                                        r.choice([0, 1, 2, 3, 4, u32()]), 0),
            O.COPY_FILE_RANGE: lambda: self.fixed(
                fuse.COPY_FILE_RANGE_IN, fh(), small(), self.nodeid(), fh(), small(),
                small(), r.choice([0, u64()])),
            O.SYNCFS: lambda: self.fixed(fuse.SYNCFS_IN, 0),
            O.TMPFILE: lambda: self.fixed(fuse.CREATE_IN, r.choice([2, u32()]), u32(),
                                          0o022, 0),
        }
        arg = builders[op]() if op in builders else r.randbytes(r.randrange(64))
        roll = r.random()
        if roll < 0.08 and arg:
            arg = arg[: r.randrange(len(arg))]  # truncated
        elif roll < 0.16:
            arg += r.randbytes(r.randrange(1, 64))  # trailing junk
        return arg

    def write_arg(self) -> bytes:
        r = self.rng
        data = r.randbytes(r.choice([0, 1, 100, 4096, 9000]))
        size = len(data) if r.random() < 0.7 else self.small(1 << 21)
        return self.fixed(fuse.WRITE_IN, self.fh(), self.offset() % (1 << 40), size,
                          r.choice([0, 1, 2, 4]), self.u64(), self.u32(), 0) + data

    def lock_arg(self) -> bytes:
        r = self.rng
        return self.fixed(fuse.LK_IN, self.fh(), self.u64(), self.offset(), self.offset(),
                          r.choice([0, 1, 2, 3, self.u32()]), self.u32(),
                          r.choice([0, 1, self.u32()]), 0)

    def batch_forget_arg(self) -> bytes:
        r = self.rng
        count = r.choice([0, 1, 3, 1000, 0xFFFFFFFF])
        items = b"".join(fuse.FORGET_ONE.pack(self.nodeid(), r.choice([1, self.u64()]))
                         for _ in range(min(count, r.randrange(4))))
        return fuse.BATCH_FORGET_IN.pack(count, 0) + items

    # ----- sending ---------------------------------------------------------------

    def send_one(self) -> None:
        r = self.rng
        ops = [o for o in O if o not in (O.INIT, O.DESTROY, O.SETLKW)]
        op = r.choice(UNKNOWN_OPCODES) if r.random() < 0.04 else int(r.choice(ops))
        arg = self.build(op)
        nodeid = self.nodeid()
        uid = 0 if r.random() < 0.8 else r.choice([1000, 65534, 0xFFFFFFFF])
        q = r.choice(QUEUES)
        srv = self.srv
        unique = srv.next_unique()
        self.unique_of_last = unique
        hdr = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), op, unique, nodeid, uid,
                                  uid, 4242, 0, 0)
        readable = [hdr + arg] if r.random() < 0.7 or not arg else [hdr, arg]
        written, out = self.chain(q, readable)
        what = f"opcode {op} nodeid {nodeid:#x} arg {arg[:80]!r} on queue {q}"
        if op in NO_REPLY:
            assert written == 0, f"{what}: a reply of {written} bytes to a FORGET"
            return
        if written == 0:
            assert op in MAYBE_NO_REPLY, f"{what}: no reply"
            return
        assert written >= fuse.OUT_HEADER_SIZE, f"{what}: reply of {written} bytes"
        total, error, got = fuse.OUT_HEADER.unpack_from(out)
        assert got == unique, f"{what}: reply for request {got}"
        assert total == written, f"{what}: header says {total}, used element {written}"
        assert -4095 <= error <= 0, f"{what}: error {error}"
        if op in UNKNOWN_OPCODES:
            assert error == -38, f"{what}: unknown opcode answered {error}"  # ENOSYS
        payload = out[fuse.OUT_HEADER_SIZE:]
        if error == 0:
            self.learn(op, payload)

    def chain(self, q: int, readable: list[bytes]) -> tuple[int, bytes]:
        fe = self.srv.fe
        descs = []
        for gpa, data in zip(self.bufs[q], readable, strict=False):
            assert len(data) <= READ_ROOM
            fe.mem[fe.off(gpa) : fe.off(gpa) + len(data)] = data
            descs.append((gpa, len(data), 0))
        descs.append((self.bufs[q][2], OUT_ROOM, F_WRITE))
        head = fe.submit_descs(q, descs)
        return self.srv.wait(q, head, descs)

    def learn(self, op: int, payload: bytes) -> None:
        """Keep nodeids and handles the daemon handed out, so later requests use them."""
        if op in (O.LOOKUP, O.MKDIR, O.MKNOD, O.SYMLINK, O.LINK, O.CREATE, O.TMPFILE) \
                and len(payload) >= 8:
            self.nodeids.append(struct.unpack_from("<Q", payload)[0])
        if op in (O.OPEN, O.OPENDIR) and len(payload) >= 8:
            self.fhs.append(struct.unpack_from("<Q", payload)[0])
        if op in (O.CREATE, O.TMPFILE) and len(payload) >= fuse.ENTRY_OUT_SIZE + 8:
            self.fhs.append(struct.unpack_from("<Q", payload, fuse.ENTRY_OUT_SIZE)[0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_requests_never_break_the_daemon(tmp_path: Path, seed: int) -> None:
    base = tmp_path
    with serve(base) as srv:
        (srv.share / "d").mkdir()
        (srv.share / "d" / "sub").write_bytes(b"sub\n")
        (srv.share / "escape").symlink_to(srv.outside / "victim")
        before = outside_snapshot(base, srv.share)
        fz = Fuzzer(srv, seed)
        for name in (KNOWN, b"d", b"escape"):
            error, nodeid, _ = srv.lookup(fuse.ROOT_ID, name)
            assert error == 0
            fz.nodeids.append(nodeid)
        error, fh = srv.open(fz.nodeids[1], os.O_RDWR)
        assert error == 0
        fz.fhs.append(fh)
        error, dfh = srv.opendir(fuse.ROOT_ID)
        assert error == 0
        fz.fhs.append(dfh)
        for _ in range(REQUESTS_PER_SEED):
            fz.send_one()
        # the share may look very different now; the known file is made again from the
        # host side, and must be served exactly on both queues by the same workers
        known = srv.share / KNOWN.decode()
        if known.is_dir() and not known.is_symlink():
            import shutil

            shutil.rmtree(known)
        elif known.exists() or known.is_symlink():
            known.unlink()
        known.write_bytes(KNOWN_DATA)
        os.chmod(srv.share, 0o755)
        srv.assert_alive(queues=QUEUES)
        assert outside_snapshot(base, srv.share) == before
        log = srv.log()
        assert "Traceback" not in log, log[-4000:]


# ===================================================================================
# random descriptor chains
# ===================================================================================

CHAINS_PER_SEED = 1500
CANARY_SIZE = 256 * 1024


def valid_request(rng: random.Random, unique: int) -> bytes:
    """A request the daemon would answer if the chain around it were sound."""
    op, arg = rng.choice([
        (O.GETATTR, fuse.GETATTR_IN.pack(0, 0, 0)),
        (O.LOOKUP, KNOWN + b"\0"),
        (O.STATFS, b""),
        (O.READDIR, fuse.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)),
    ])
    return fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), op, unique, fuse.ROOT_ID,
                               0, 0, 1, 0, 0) + arg


@pytest.mark.parametrize("seed", [1, 2])
def test_random_descriptor_chains_never_break_the_daemon(tmp_path: Path, seed: int) -> None:
    """Chains of 1-6 descriptors, direct or in an indirect table, with addresses inside
    and outside guest memory, random lengths, flags and next indexes (loops included).
    Every chain is completed (answered or dropped with length 0) and the daemon writes
    only into the chain's own device-writable buffers: a canary region that descriptors
    may only read stays byte for byte as it was."""
    rng = random.Random(seed)
    with serve(tmp_path) as srv:
        fe = srv.fe
        canary = fe.alloc(CANARY_SIZE, 4096)
        pattern = rng.randbytes(CANARY_SIZE)
        fe.mem[fe.off(canary) : fe.off(canary) + CANARY_SIZE] = pattern
        write_area = fe.alloc(8 * 8192, 4096)
        tables = {q: fe.alloc(16 * 8, 16) for q in QUEUES}
        end = GUEST_BASE + fe.size

        def outside() -> int:
            return rng.choice([0, 0x1000, end - 16, end, end + 4096, (1 << 64) - 4096,
                               GUEST_BASE - 8, rng.getrandbits(64) | (1 << 63)])

        def address(length: int) -> int:
            roll = rng.random()
            if roll < 0.5:
                return canary + rng.randrange(CANARY_SIZE - min(length, CANARY_SIZE - 1))
            if roll < 0.6:
                return outside()
            return canary + rng.randrange(CANARY_SIZE)

        for _ in range(CHAINS_PER_SEED):
            q = rng.choice(QUEUES)
            ring = fe.rings[q]
            # the request itself sits at the start of the canary's first page, which
            # descriptors read; it is restored after each chain
            raw = valid_request(rng, srv.next_unique())
            fe.mem[fe.off(canary) : fe.off(canary) + len(raw)] = raw
            n = rng.randrange(1, 7)
            # stale descriptors of earlier chains are zeroed, so a random next index
            # reaches only an empty readable descriptor and the writable room is known
            for table_gpa, entries in ((ring.desc, ring.size), (tables[q], 8)):
                fe.mem[fe.off(table_gpa) : fe.off(table_gpa) + 16 * entries] = \
                    bytes(16 * entries)
            descs = []
            if rng.random() < 0.5:  # well formed, the reply split over small buffers
                cut = rng.randrange(1, len(raw)) if rng.random() < 0.3 else len(raw)
                descs = [(canary, cut, F_NEXT, 1)]
                if cut < len(raw):
                    descs.append((canary + cut, len(raw) - cut, F_NEXT, 2))
                for i in range(rng.randrange(1, 5)):
                    length = rng.choice([1, 8, 16, 17, 40, 100, 4096, 8192])
                    descs.append((write_area + 8192 * i, length, F_WRITE | F_NEXT,
                                  len(descs) + 1))
                a, ln, f, _ = descs[-1]
                descs[-1] = (a, ln, f & ~F_NEXT, 0)
                n = len(descs)
            for i in range(0 if descs else n):
                writable = rng.random() < 0.4
                length = rng.choice([0, 1, 16, 40, 64, 4096, 8192, 70000, 0xFFFFFFFF])
                if writable:  # its own buffer, or nowhere the guest has memory
                    addr = write_area + 8192 * i if rng.random() < 0.9 else outside()
                    if addr >= write_area:
                        length = min(length, 8192)
                else:
                    addr = canary if i == 0 and rng.random() < 0.7 else address(length)
                    if i == 0 and addr == canary:
                        length = len(raw)
                flags = F_WRITE if writable else 0
                if rng.random() < 0.05:
                    flags |= F_INDIRECT
                nxt = i + 1 if rng.random() < 0.85 else rng.randrange(ring.size + 3)
                if i + 1 < n:
                    flags |= F_NEXT
                elif rng.random() < 0.05:
                    flags |= F_NEXT  # a last descriptor that says it is not
                descs.append((addr, length, flags, nxt))
            if rng.random() < 0.3:  # all of it in an indirect table
                table = tables[q]
                for i, (addr, length, flags, nxt) in enumerate(descs):
                    fe.put_desc(table, i, addr, length, flags, min(nxt, 7))
                head = ring.free.pop(0)
                tlen = rng.choice([16 * n, 16 * n, 0, 24, 16 * 9])
                fe.put_desc(ring.desc, head, table, tlen, F_INDIRECT, 0)
            else:
                ids = [ring.free.pop(0) for _ in descs]
                for k, (addr, length, flags, nxt) in enumerate(descs):
                    link = ids[k + 1] if k + 1 < n and nxt == k + 1 else nxt % ring.size
                    fe.put_desc(ring.desc, ids[k], addr, length, flags, link)
                head = ids[0]
            fe.publish(q, head)
            got, written = fe.wait_used(q)
            assert got == head, f"used head {got}, expected {head}"
            ring.free = list(range(ring.size))
            room = sum(length for _, length, flags, _ in descs if flags & F_WRITE)
            assert written <= max(room, 0) or written == 0, \
                f"used length {written} with {room} writable bytes in {descs}"
            fe.mem[fe.off(canary) : fe.off(canary) + len(raw)] = pattern[: len(raw)]
            assert bytes(fe.mem[fe.off(canary) : fe.off(canary) + CANARY_SIZE]) == pattern, \
                f"the daemon wrote into memory the chain only let it read: {descs}"
        srv.assert_alive(queues=QUEUES)
        assert "Traceback" not in srv.log()
