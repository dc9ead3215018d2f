"""The capabilities a server started as root keeps: only what serving files for callers
of any uid needs (virtiofsd 1.13's set), adjusted by --modcaps. Everything else leaves the
effective, permitted, inheritable and bounding sets before the first guest request, so a
compromised server cannot load modules, trace processes, change the clock, ...
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator

# capability numbers are the positions in this list (linux/capability.h)
NAMES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap "
    "linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner "
    "sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice "
    "sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap "
    "mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf "
    "checkpoint_restore"
).split()
SERVING = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod",
           "setfcap")
PR_CAPBSET_DROP = 24
_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _get_sets() -> ctypes.Array:
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(_Header(_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return data


def _set_sets(data: ctypes.Array) -> None:
    if _libc.capset(ctypes.byref(_Header(_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


@contextlib.contextmanager
def without_fsetid() -> Iterator[None]:
    """Drop CAP_FSETID from this thread's effective set for the block, so the host kernel
    clears setuid/setgid on a write or truncate as it would for an unprivileged caller
    (virtiofsd's handling of FUSE_HANDLE_KILLPRIV_V2)."""
    data = _get_sets()
    saved = data[0].effective
    fsetid = 1 << NAMES.index("fsetid")
    if not saved & fsetid:
        yield  # an unprivileged daemon: the kernel clears the bits anyway
        return
    data[0].effective = saved & ~fsetid
    _set_sets(data)
    try:
        yield
    finally:
        data[0].effective = saved
        _set_sets(data)


def retained(file_handles: bool, modcaps: Iterable[tuple[str, str]] = ()) -> set[str]:
    """virtiofsd's set (+dac_read_search for file handles), then --modcaps in order."""
    keep = set(SERVING)
    if file_handles:
        keep.add("dac_read_search")
    for action, name in modcaps:
        (keep.add if action == "+" else keep.discard)(name)
    return keep


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return min(int(f.read()), len(NAMES) - 1)
    except (OSError, ValueError):
        return len(NAMES) - 1


def drop_all_but(keep: set[str], last: int) -> None:
    """Shrink the bounding set, then this thread's sets (workers cloned later inherit
    them). Raises OSError naming the step that failed."""
    for number in range(last + 1):
        if NAMES[number] not in keep and _libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"dropping cap_{NAMES[number]} from the bounding set: "
                               f"{os.strerror(err)}")
    mask = sum(1 << NAMES.index(name) for name in keep)
    data = (_Data * 2)()
    for word in (0, 1):
        bits = (mask >> (32 * word)) & 0xFFFFFFFF
        data[word].effective = data[word].permitted = bits
        data[word].inheritable = 0
    _set_sets(data)


def effective_mask(pid: int | str = "self") -> int:
    """CapEff of a process, as /proc shows it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise OSError("no CapEff line")
