"""Keep OpenSSL out of the daemon.

The daemon never speaks TLS: its only socket is the vhost-user one, and the sandboxed
server has no network at all. Yet asyncio and uvloop import ``ssl`` unconditionally, and
that loads and initialises libssl and libcrypto: about 4 MB of PSS per daemon (measured
with ``benchmarks.run``; one daemon runs per VM). Before those imports, ``install()``
puts a placeholder ``ssl`` module in ``sys.modules`` that has the names asyncio and
uvloop read at import time and refuses every use. If uvloop will not import with it
(a release that reads more names), the real module is restored and loaded instead.
"""

from __future__ import annotations

import sys
import types

_NAME = "pyvirtiofsd: no TLS in this process"


class SSLError(OSError):
    pass


class SSLWantReadError(SSLError):
    pass


class SSLWantWriteError(SSLError):
    pass


class SSLSyscallError(SSLError):
    pass


class SSLZeroReturnError(SSLError):
    pass


class SSLEOFError(SSLError):
    pass


class CertificateError(ValueError):
    pass


class _Refused:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise SSLError(f"{_NAME}: TLS is not available in pyvirtiofsd")


def _placeholder() -> types.ModuleType:
    mod = types.ModuleType("ssl", _NAME)
    for cls in (SSLError, SSLWantReadError, SSLWantWriteError, SSLSyscallError,
                SSLZeroReturnError, SSLEOFError, CertificateError):
        setattr(mod, cls.__name__, cls)
    for name in ("SSLContext", "SSLObject", "SSLSocket", "MemoryBIO"):
        setattr(mod, name, type(name, (_Refused,), {}))
    mod.create_default_context = _Refused
    mod.SSL_ERROR_WANT_READ = 2  # OpenSSL's values, as the real module has them
    mod.SSL_ERROR_WANT_WRITE = 3
    mod.SSL_ERROR_SYSCALL = 5
    mod.pyvirtiofsd_placeholder = True
    return mod


def install() -> bool:
    """Import asyncio and uvloop without OpenSSL; True if the placeholder is in use."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False  # too late: whoever imported them first has the real module
    sys.modules["ssl"] = _placeholder()
    try:
        import asyncio  # noqa: F401

        import uvloop  # noqa: F401
    except (AttributeError, ImportError, TypeError):
        for name in [m for m in sys.modules if m == "ssl" or m.startswith(("asyncio", "uvloop"))]:
            del sys.modules[name]
        import uvloop  # noqa: F401 - with the real ssl this time

        return False
    return True


def uninstall() -> None:
    """Give the real ``ssl`` back to a process that is not the daemon (``pyvirtiofsd
    stats``, whose prometheus_client reads ssl's names at import time). asyncio and uvloop
    keep the placeholder they imported; such a process never uses them for TLS."""
    mod = sys.modules.get("ssl")
    if mod is not None and getattr(mod, "pyvirtiofsd_placeholder", False):
        del sys.modules["ssl"]
