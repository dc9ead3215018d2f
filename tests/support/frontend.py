"""A vhost-user front-end written for the tests: plays QEMU's part without a guest.

It shares memfd "guest memory" with the daemon, lays out split rings, and puts FUSE
requests straight into them, so tests can send exactly the bytes a hostile guest could
(bad descriptor addresses, loops, truncated headers) and read the daemon's replies.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
GUEST_BASE = 0x100000  # guest-physical base of the one region
UVA_BASE = 0x7F0000000000  # made-up front-end virtual address of the region


@dataclass
class Ring:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int
    next_avail: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)


@dataclass
class Sent:
    """A request on its way: where its answer will be."""

    q: int
    head: int
    unique: int
    out_gpa: int


class Frontend:
    def __init__(self, socket_path: str, memory_size: int = 64 << 20, queue_size: int = 256,
                 event_idx: bool = True, connect_timeout: float = 10) -> None:
        """``connect_timeout``: how long to retry a socket that is missing or refuses
        (0: one try)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, memory_size)
        self.mem = mmap.mmap(self.memfd, memory_size)
        self.size = memory_size
        self.queue_size = queue_size
        self.event_idx = event_idx
        self.brk = 0x10000
        self.rings: dict[int, Ring] = {}
        self.unique = 0
        self.acked_features = 0
        self.reply_timeout = 10.0

    # ----- raw vhost-user ---------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        data = vu.HEADER.pack(request, flags, len(payload)) + payload
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            if fds
            else []
        )
        self.sock.sendmsg([data], anc)

    def recv_reply(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next vhost-user reply, within ``timeout`` seconds (default
        ``self.reply_timeout``, 10 s)."""
        self.sock.settimeout(self.reply_timeout if timeout is None else timeout)
        head = self._recv_exact(vu.HEADER_SIZE)
        request, flags, size = vu.HEADER.unpack(head)
        assert flags & vu.FLAG_REPLY, f"reply without the reply flag: {flags:#x}"
        return request, self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("daemon closed the vhost-user connection")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        got, body = self.recv_reply()
        assert got == request
        return body

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY; returns the REPLY_ACK status (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        got, body = self.recv_reply()
        assert got == request
        return struct.unpack("<Q", body)[0]

    # ----- set-up like QEMU -------------------------------------------------------

    def alloc(self, size: int, align: int = 64) -> int:
        self.brk = (self.brk + align - 1) & ~(align - 1)
        gpa = GUEST_BASE + self.brk
        self.brk += size
        assert self.brk <= self.size, "test guest memory exhausted"
        return gpa

    def off(self, gpa: int) -> int:
        return gpa - GUEST_BASE

    def setup(self, num_queues: int = 2,
              extra_regions: list[tuple[int, int, int, int, int]] | None = None,
              protocol_features: int = 0) -> None:
        """Negotiate, send the memory table and start ``num_queues`` rings.
        ``extra_regions``: (gpa, size, uva, mmap_offset, fd) sent in the first memory
        table besides the test guest's own memory. ``protocol_features``: more protocol
        features to ask for than MQ and REPLY_ACK (those the daemon offers)."""
        features = vu.decode_u64(self.call(vu.Request.GET_FEATURES))
        acked = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES
        acked |= features & vu.VIRTIO_RING_F_INDIRECT_DESC
        if self.event_idx:
            acked |= features & vu.VIRTIO_RING_F_EVENT_IDX
        self.send(vu.Request.SET_OWNER)
        pf = vu.decode_u64(self.call(vu.Request.GET_PROTOCOL_FEATURES))
        self.send(vu.Request.SET_PROTOCOL_FEATURES,
                  vu.U64.pack(pf & (vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK
                                    | protocol_features)))
        self.acked_features = acked
        assert self.ack(vu.Request.SET_FEATURES, vu.U64.pack(acked)) == 0
        extra = extra_regions or []
        table = vu.MEM_TABLE_HEAD.pack(1 + len(extra), 0) + vu.MEM_REGION.pack(
            GUEST_BASE, self.size, UVA_BASE, 0) + b"".join(
            vu.MEM_REGION.pack(*r[:4]) for r in extra)
        assert self.ack(vu.Request.SET_MEM_TABLE, table,
                        [self.memfd] + [r[4] for r in extra]) == 0
        for index in range(num_queues):
            self.add_ring(index)

    def add_ring(self, index: int) -> Ring:
        n = self.queue_size
        desc = self.alloc(16 * n, 16)
        avail = self.alloc(6 + 2 * n, 2)
        used = self.alloc(6 + 8 * n, 4)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ring = Ring(index, n, desc, avail, used, kick, call, free=list(range(n)))
        uva = lambda gpa: UVA_BASE + gpa - GUEST_BASE  # noqa: E731
        assert self.ack(vu.Request.SET_VRING_NUM, vu.VRING_STATE.pack(index, n)) == 0
        assert self.ack(vu.Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
            index, 0, uva(desc), uva(used), uva(avail), 0)) == 0
        assert self.ack(vu.Request.SET_VRING_BASE, vu.VRING_STATE.pack(index, 0)) == 0
        assert self.ack(vu.Request.SET_VRING_KICK, vu.U64.pack(index), [kick]) == 0
        assert self.ack(vu.Request.SET_VRING_CALL, vu.U64.pack(index), [call]) == 0
        assert self.ack(vu.Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1)) == 0
        self.rings[index] = ring
        return ring

    # ----- rings ------------------------------------------------------------------

    def put_desc(self, table_gpa: int, i: int, addr: int, length: int, flags: int,
                 nxt: int) -> None:
        DESC.pack_into(self.mem, self.off(table_gpa) + 16 * i, addr, length, flags, nxt)

    def make_buffers(self, readable: list[bytes], writable: list[int]) -> list[tuple]:
        bufs = []
        for data in readable:
            gpa = self.alloc(max(len(data), 1), 8)
            self.mem[self.off(gpa) : self.off(gpa) + len(data)] = data
            bufs.append((gpa, len(data), 0))
        for size in writable:
            bufs.append((self.alloc(max(size, 1), 8), size, F_WRITE))
        return bufs

    def submit_descs(self, q: int, descs: list[tuple[int, int, int]], *,
                     indirect: bool = False, kick: bool = True) -> int:
        """descs: (gpa, len, flags) in chain order; NEXT links are added here."""
        ring = self.rings[q]
        if indirect:
            table = self.alloc(16 * len(descs), 16)
            for i, (addr, length, flags) in enumerate(descs):
                nxt = i + 1 if i + 1 < len(descs) else 0
                self.put_desc(table, i, addr, length, flags | (F_NEXT if nxt else 0), nxt)
            head = ring.free.pop(0)
            self.put_desc(ring.desc, head, table, 16 * len(descs), F_INDIRECT, 0)
        else:
            ids = [ring.free.pop(0) for _ in descs]
            for k, (addr, length, flags) in enumerate(descs):
                last = k + 1 == len(descs)
                self.put_desc(ring.desc, ids[k], addr, length,
                              flags | (0 if last else F_NEXT), 0 if last else ids[k + 1])
            head = ids[0]
        self.publish(q, head, kick)
        return head

    def publish(self, q: int, head: int, kick: bool = True) -> None:
        ring = self.rings[q]
        a = self.off(ring.avail)
        struct.pack_into("<H", self.mem, a + 4 + 2 * (ring.next_avail % ring.size), head)
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, a + 2, ring.next_avail)
        if kick:
            os.eventfd_write(ring.kick, 1)

    def wait_used(self, q: int, timeout: float = 10) -> tuple[int, int]:
        """Next used element (head, written length)."""
        ring = self.rings[q]
        u = self.off(ring.used)
        deadline = time.monotonic() + timeout
        while True:
            idx = struct.unpack_from("<H", self.mem, u + 2)[0]
            if idx != ring.last_used:
                elem = u + 4 + 8 * (ring.last_used % ring.size)
                head, length = struct.unpack_from("<II", self.mem, elem)
                ring.last_used = (ring.last_used + 1) & 0xFFFF
                if self.event_idx:  # used_event: interrupt us for every element
                    struct.pack_into("<H", self.mem, self.off(ring.avail) + 4 + 2 * ring.size,
                                     ring.last_used)
                if head < ring.size and head not in ring.free:
                    ring.free.append(head)
                return head, length
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {q}: no used element within {timeout} s")
            select.select([ring.call], [], [], min(left, 0.05))
            try:
                os.eventfd_read(ring.call)
            except BlockingIOError:
                pass

    def read_gpa(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem[self.off(gpa) : self.off(gpa) + n])

    # ----- FUSE -------------------------------------------------------------------

    def fuse(self, opcode: int, nodeid: int, arg: bytes = b"", *, q: int = 1,
             out_size: int = 4096, uid: int = 0, gid: int = 0, indirect: bool = False,
             extra_readable: list[bytes] | None = None) -> tuple[int, bytes]:
        """One request; returns (error, payload) as the guest would see them."""
        sent = self.start(opcode, nodeid, arg, q=q, out_size=out_size, uid=uid, gid=gid,
                          indirect=indirect, extra_readable=extra_readable)
        return self.finish(sent)

    def start(self, opcode: int, nodeid: int, arg: bytes = b"", *, q: int = 1,
              out_size: int = 4096, uid: int = 0, gid: int = 0, indirect: bool = False,
              extra_readable: list[bytes] | None = None) -> Sent:
        """Submit a request without waiting for its answer (see finish)."""
        self.unique += 1
        readable = [arg] + (extra_readable or [])
        length = fuse.IN_HEADER_SIZE + sum(len(r) for r in readable)
        hdr = fuse.IN_HEADER.pack(length, opcode, self.unique, nodeid, uid, gid, 1, 0, 0)
        bufs = self.make_buffers([hdr] + readable, [out_size] if out_size else [])
        head = self.submit_descs(q, bufs, indirect=indirect)
        return Sent(q, head, self.unique, bufs[-1][0] if out_size else 0)

    def finish(self, sent: Sent, timeout: float = 10) -> tuple[int, bytes]:
        """Wait for the answer to a request start() submitted (the next one used on its
        queue must be it)."""
        return self.finish_all([sent], timeout)[0]

    def finish_all(self, sents: list[Sent], timeout: float = 10) -> list[tuple[int, bytes]]:
        """Answers to several started requests, in whatever order the device used them."""
        by_head = {(s.q, s.head): s for s in sents}
        answers: dict[tuple[int, int], tuple[int, bytes]] = {}
        for q in sorted({s.q for s in sents}):
            while any(key[0] == q and key not in answers for key in by_head):
                got, written = self.wait_used(q, timeout)
                sent = by_head.get((q, got))
                assert sent is not None and (q, got) not in answers, \
                    f"queue {q}: used head {got} was not expected"
                answers[(q, got)] = self._answer(sent, written)
        return [answers[(s.q, s.head)] for s in sents]

    def _answer(self, sent: Sent, written: int) -> tuple[int, bytes]:
        if not sent.out_gpa:
            return 0, b""
        raw = self.read_gpa(sent.out_gpa, written)
        assert written >= fuse.OUT_HEADER_SIZE, f"reply of {written} bytes"
        total, error, unique = fuse.OUT_HEADER.unpack_from(raw)
        assert unique == sent.unique and total == written
        return error, raw[fuse.OUT_HEADER_SIZE :]

    def init(self, q: int = 1) -> bytes:
        arg = fuse.INIT_IN.pack(7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44)
        error, payload = self.fuse(fuse.Opcode.INIT, 0, arg, q=q)
        assert error == 0, f"INIT failed: {error}"
        return payload

    def lookup(self, parent: int, name: bytes, q: int = 1) -> tuple[int, bytes]:
        return self.fuse(fuse.Opcode.LOOKUP, parent, name + b"\0", q=q)

    def close(self) -> None:
        self.sock.close()
        for ring in self.rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.mem.close()
        os.close(self.memfd)


def reclaim(fe: Frontend, q: int) -> None:
    """Every request here completes before the next is sent, so once its used element
    is back all descriptors are free again (Frontend.wait_used frees only the head)."""
    ring = fe.rings[q]
    ring.free = list(range(ring.size))
