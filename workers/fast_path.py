"""The decision which requests daemon/native/fuse_ops.c answers, and the context it
answers them with (``pyvfs_fast_ctx_t``).

The opcodes come from the table (daemon/protocol/opcodes.py: rows with ``in_c``, less
those whose ``c_declines_when`` holds for this file system); everything else C needs comes
from the file system's public settings (``PassthroughFs.c_path_settings()``) and its shared
tables. The switch for the whole C path is ``--c-fast-path`` (daemon/options.py; default
from the environment variable ``PYVIRTIOFSD_C_PATH``): off, every request is answered in
Python, as a differential test or a debugging session wants.
"""

from __future__ import annotations

from daemon.fs import proc_fd
from daemon.fs.passthrough import PassthroughFs
from daemon.native._sys import ffi
from daemon.protocol import fuse, opcodes

_SHARED: dict[tuple[int, bool], FastPathContext] = {}


def bit(opcode: int) -> int:
    """The opcode's bit in ``pyvfs_fast_ctx_t.c_ops``."""
    return 1 << opcode


class FastPathContext:
    """A worker's ``pyvfs_fast_ctx_t`` (``.c``) and the buffers it points into, which
    must live as long as it does."""

    def __init__(self, fs: PassthroughFs, enabled: bool = True) -> None:
        settings = fs.c_path_settings()
        self.fs = fs
        self.enabled = enabled
        self.mask = opcodes.c_mask(settings.conditions) if enabled else 0
        self.c = ctx = ffi.new("pyvfs_fast_ctx_t *")
        ctx.c_ops = self.mask
        handles = fs.handles.c_api()
        ctx.handles, ctx.ht_pin, ctx.ht_unpin = handles["base"], handles["ht_pin"], \
            handles["ht_unpin"]
        ctx.ht_close = handles["ht_close"]
        api = fs.inodes.c_api()
        ctx.inodes = api["base"]
        for name in ("it_pin", "it_unpin", "it_claim_or_insert", "it_forget", "it_lookup",
                     "it_handle_of", "it_claim", "seg_removals"):
            setattr(ctx, name, api[name])
        ctx.fd_cache = fs.fd_cache.c  # swept in C of inodes the guest forgot
        self._session = ffi.from_buffer(fs.session)
        ctx.session = int(ffi.cast("uintptr_t", self._session))
        ctx.submounts_flag = fuse.SUBMOUNTS
        ctx.root_mnt_id = settings.root_mnt_id
        ctx.mount_fd = settings.mount_fd
        ctx.use_handles = int(settings.use_handles)
        ctx.mandatory = int(settings.mandatory_handles)
        ctx.timeout_sec, ctx.timeout_nsec = settings.timeout
        ctx.negative_lookup = int(settings.negative_lookup)
        self._lock_live = None
        if fs.lock_owners is not None:
            self._lock_live = ffi.from_buffer(fs.lock_owners.mem)
            ctx.lock_live = int(ffi.cast("uintptr_t", self._lock_live)) + \
                fs.lock_owners.live_offset
        ctx.create_clear = settings.create_open_clear
        ctx.create_fopen = settings.create_reply_flags
        ctx.own_uid, ctx.own_gid = settings.own_ids
        ctx.ht_open = handles["ht_open"]
        ctx.procdir = proc_fd.fd_directory_fd()  # OPEN and SETATTR reopen fds through it

    @classmethod
    def shared(cls, fs: PassthroughFs, enabled: bool) -> FastPathContext:
        """One context per file system and switch, made once: by the workers' template
        before it clones them (workers/template/process.py), so a worker refers to it instead of
        building its own (which wrote to ~0.45 MB of pages it shared with the template:
        the settings, the opcode table, the tables' C entry points). The context holds
        only addresses that are the same in every clone and settings fixed at start-up."""
        key = (id(fs), enabled)
        made = _SHARED.get(key)
        if made is None or made.fs is not fs:
            made = _SHARED[key] = cls(fs, enabled)
        return made

    def answers(self, opcode: int) -> bool:
        """Whether C may answer this opcode (it still declines single requests)."""
        return bool(self.mask & bit(opcode))

