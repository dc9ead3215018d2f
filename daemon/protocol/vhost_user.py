"""vhost-user protocol codec: message framing and payload structs, no I/O.

The supervisor feeds received bytes (and the fds that came with them) into
:class:`MessageReader` and gets :class:`Message` objects back; replies are built with
:func:`encode_reply`. Layouts follow QEMU's ``docs/interop/vhost-user.rst``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 4096 + 16  # largest legal payload (GET_CONFIG with 4 KiB config + header)

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# requests the front-end always waits for an answer to (an empty payload is an error)
REQUESTS_WITH_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS,
    Request.GET_INFLIGHT_FD, Request.GET_STATUS, Request.GET_SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD, Request.CHECK_DEVICE_STATE, Request.POSTCOPY_ADVISE,
    Request.SET_LOG_BASE,  # with LOG_SHMFD, the only way we take it
})

# virtio feature bits the device offers
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26  # the front-end logs dirty pages (live migration)
VRING_F_LOG = 1 << 0  # SET_VRING_ADDR flags: log_guest_addr is valid

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
CONFIG_HEAD = struct.Struct("<III")
LOG = struct.Struct("<QQ")  # SET_LOG_BASE: mmap_size, mmap_offset
DEVICE_STATE = struct.Struct("<II")  # SET_DEVICE_STATE_FD: direction, phase
MAX_MEM_TABLE_REGIONS = 8


class ProtocolError(Exception):
    """The front-end sent something that breaks the vhost-user framing or a payload."""


@dataclass(slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"


@dataclass(slots=True, frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(slots=True, frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


def decode_header(header: bytes) -> tuple[int, int, int]:
    """(request, flags, payload size) of a message header, validated.

    Fds travel with the header's sendmsg, so a reader must receive the 12 header bytes
    on their own, with their ancillary data, and only then the payload."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"short vhost-user header ({len(header)} bytes)")
    request, flags, size = HEADER.unpack(header)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"bad vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes for request {request} is too large")
    return request, flags, size


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need {size}")


def decode_u64(payload: bytes, what: str = "u64") -> int:
    _need(payload, 8, what)
    return U64.unpack_from(payload)[0]


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    _need(payload, VRING_STATE.size, "vring state")
    return VRING_STATE.unpack_from(payload)


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, VRING_ADDR.size, "vring address")
    return VringAddr(*VRING_ADDR.unpack_from(payload))


def decode_vring_fd(payload: bytes) -> tuple[int, bool]:
    """Returns (queue index, has_fd) for SET_VRING_KICK/CALL/ERR."""
    value = decode_u64(payload, "vring fd")
    return value & VRING_IDX_MASK, not value & VRING_NOFD_MASK


def decode_mem_table(payload: bytes) -> list[MemoryRegion]:
    _need(payload, MEM_TABLE_HEAD.size, "memory table")
    count, _ = MEM_TABLE_HEAD.unpack_from(payload)
    if count > MAX_MEM_TABLE_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (max {MAX_MEM_TABLE_REGIONS})")
    _need(payload, MEM_TABLE_HEAD.size + count * MEM_REGION.size, "memory table regions")
    return [
        MemoryRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
        for i in range(count)
    ]


def decode_single_region(payload: bytes) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: 8 bytes of padding, then one region."""
    _need(payload, 8 + MEM_REGION.size, "memory region")
    return MemoryRegion(*MEM_REGION.unpack_from(payload, 8))


def decode_log(payload: bytes) -> tuple[int, int]:
    """SET_LOG_BASE: (mmap size, mmap offset) of the dirty log whose fd came along."""
    _need(payload, LOG.size, "log base")
    return LOG.unpack_from(payload)


def decode_config_request(payload: bytes) -> tuple[int, int, int]:
    _need(payload, CONFIG_HEAD.size, "config request")
    return CONFIG_HEAD.unpack_from(payload)


def encode_config_reply(offset: int, flags: int, data: bytes) -> bytes:
    return CONFIG_HEAD.pack(offset, len(data), flags) + data


def virtio_fs_config(tag: str, num_request_queues: int) -> bytes:
    """virtio-fs device config space: 36-byte NUL-padded tag, then le32 queue count."""
    raw = tag.encode()
    return raw.ljust(36, b"\0") + struct.pack("<I", num_request_queues)
