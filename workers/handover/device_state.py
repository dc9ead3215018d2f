"""The vhost-user device state the supervisor keeps (what the front-end negotiated and set
up: features, the memory table, each ring's size, addresses, base and fds, the dirty log),
and its plain form for a live upgrade: the new program reads it back
(daemon/host/handover.py), with the same fd numbers, which the exec keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon.protocol import vhost_user as vu
from workers.pool import Worker


@dataclass
class VringState:
    size: int = 0
    addr: vu.VringAddr | None = None
    base: int = 0
    kick_fd: int = -1  # >= 0 while the ring runs (SET_VRING_KICK until GET_VRING_BASE)
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    worker: Worker | None = None  # the one worker serving the ring
    restarts: int = 0
    resume: bool = False  # a worker was lost: the next one starts at the used index


@dataclass
class DeviceState:
    acked_features: int = 0
    protocol_features: int = 0
    regions: list[tuple[vu.MemoryRegion, int]] = field(default_factory=list)
    vrings: dict[int, VringState] = field(default_factory=dict)
    # SET_LOG_BASE: the front-end's dirty log (a memfd), used while VHOST_F_LOG_ALL is acked
    log_fd: int = -1
    log_size: int = 0
    log_offset: int = 0

    @property
    def logging(self) -> bool:
        """Whether workers mark the guest pages they write (live migration)."""
        return bool(self.acked_features & vu.VHOST_F_LOG_ALL) and self.log_fd >= 0

    def log_setup(self) -> dict[str, int]:
        """The dirty log as workers take it: fd -1 while not logging."""
        if not self.logging:
            return {"fd": -1, "size": 0, "offset": 0}
        return {"fd": self.log_fd, "size": self.log_size, "offset": self.log_offset}

    def fds(self) -> list[int]:
        """Every fd the state holds (a live upgrade keeps them open across exec)."""
        out = [fd for _, fd in self.regions] + [self.log_fd]
        for v in self.vrings.values():
            out += [v.kick_fd, v.call_fd, v.err_fd]
        return [fd for fd in out if fd >= 0]

    def to_wire(self) -> dict[str, Any]:
        """Plain data for msgpack; rings whose worker runs are marked to resume from
        their in-flight records (the worker is stopped before the handover)."""
        return {
            "acked_features": self.acked_features,
            "protocol_features": self.protocol_features,
            "regions": [[r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset,
                         fd] for r, fd in self.regions],
            "vrings": {i: {"size": v.size, "base": v.base, "kick_fd": v.kick_fd,
                           "call_fd": v.call_fd, "err_fd": v.err_fd, "enabled": v.enabled,
                           "restarts": v.restarts, "resume": v.resume or v.kick_fd >= 0,
                           "addr": None if v.addr is None else [
                               v.addr.index, v.addr.flags, v.addr.desc_user_addr,
                               v.addr.used_user_addr, v.addr.avail_user_addr,
                               v.addr.log_guest_addr]}
                       for i, v in self.vrings.items()},
            "log": [self.log_fd, self.log_size, self.log_offset],
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> DeviceState:
        state = cls(acked_features=d["acked_features"], protocol_features=d["protocol_features"])
        state.regions = [(vu.MemoryRegion(g, n, u, o), fd) for g, n, u, o, fd in d["regions"]]
        for i, v in d["vrings"].items():
            state.vrings[int(i)] = VringState(
                size=v["size"], addr=None if v["addr"] is None else vu.VringAddr(*v["addr"]),
                base=v["base"], kick_fd=v["kick_fd"], call_fd=v["call_fd"],
                err_fd=v["err_fd"], enabled=v["enabled"], restarts=v["restarts"],
                resume=v["resume"])
        state.log_fd, state.log_size, state.log_offset = d["log"]
        return state
