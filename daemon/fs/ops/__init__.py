"""The FUSE operations of the passthrough file system, one module per concern. Each holds
a mixin of :class:`daemon.fs.passthrough.PassthroughFs` over the state declared in
:class:`daemon.fs.ops.base.FsBase`; the handler of an opcode keeps its name
(``op_<opcode>``, as daemon/protocol/opcodes.py names it) whichever module holds it.

==============  ======================================================================
module          answers
==============  ======================================================================
base            (the shared state; Request, GuestInputError, check_name)
inodes          FORGET, BATCH_FORGET; lookups claimed in the inode table, the root,
                inodes kept by file handle; InodeRef and HandleRef, a request's pins
context         (the caller's fsuid/fsgid while it creates, --translate-uid/gid, its
                umask under --posix-acl, security labels of new files)
attributes      GETATTR, SETATTR, ACCESS, STATFS
entries         LOOKUP, READLINK, MKNOD, MKDIR, SYMLINK, LINK, CREATE, TMPFILE, UNLINK,
                RMDIR, RENAME, RENAME2
files           OPEN, RELEASE, FLUSH, FSYNC, FALLOCATE, LSEEK, COPY_FILE_RANGE; setuid/
                setgid clearing on writes (READ and WRITE themselves are the worker's)
directories     OPENDIR, READDIR, READDIRPLUS (RELEASEDIR, FSYNCDIR: as RELEASE, FSYNC)
xattrs          GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR
locking         GETLK, SETLK, SETLKW (PendingLock), flock and POSIX record locks
session         INIT, DESTROY, SYNCFS; the flags INIT negotiated
==============  ======================================================================
"""
