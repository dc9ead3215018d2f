"""Keep the daemon's interpreter lean: no ``site`` hooks, no OpenSSL. Both cut what every
daemon process carries for its lifetime (one daemon runs per VM) before the daemon
does anything else, and both keep code the daemon does not need out of it.

**No site.** ``site`` runs every ``.pth`` file in site-packages at start-up, and those may import
anything: on the machines this project is built on one imports ``certifi`` and with it
``importlib.resources``, ``zipfile``, ``tempfile`` and ``typing``, about 1.5 MB of PSS
that one daemon per VM then carries for its lifetime (measured with ``benchmarks.run``).
A daemon that serves guests should also not run code from whatever ``.pth`` files happen
to be installed. So before it does anything else, the daemon re-executes its interpreter
with ``-S`` (no ``site``) and ``-P`` (the working directory, which may be the shared
directory, is not searched for modules), and with ``PYTHONPATH`` naming exactly the
directories its own packages and its dependencies were found in.

It also passes ``-OO``: without docstrings every module's code is smaller, 0.6 MB of
heap that the supervisor and every worker share (``benchmarks.memory_floor``). The
daemon's code uses no docstring at run time, and its ``assert`` statements only narrow
types. Python reads ``.opt-2.pyc`` files then: where the install has none (pip writes
only the plain ones), the first start writes them next to the others, or, where it may
not, compiles the sources at every start; ``python3 -m compileall -o 2`` over the
installed packages avoids that (docs/operations.md).

``exec`` keeps the pid and every inheritable fd (``--fd``, systemd's ``LISTEN_FDS``),
so libvirt and systemd see no difference. ``PYVIRTIOFSD_SITE=1`` turns this off.

**No TLS.** The daemon never speaks TLS: its only socket is the vhost-user one, and the sandboxed
server has no network at all. Yet asyncio and uvloop import ``ssl`` unconditionally, and
that loads and initialises libssl and libcrypto: about 4 MB of PSS per daemon (measured
with ``benchmarks.run``; one daemon runs per VM). Before those imports,
``install_no_tls()`` puts a placeholder ``ssl`` module in ``sys.modules`` that has the
names asyncio and uvloop read at import time and refuses every use. If uvloop will not
import with it (a release that reads more names), the real module is restored and loaded
instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

# ----- no site -----------------------------------------------------------------------

# the top-level modules the daemon imports from outside the standard library, and its own
MODULES = ("daemon", "workers", "shm_table", "supervisor", "uvloop", "msgpack", "posix_ipc",
           "_cffi_backend")
# no site, no working directory in sys.path, no docstrings (see above)
FLAGS = ("-S", "-P", "-OO")
NO_REEXEC = {"stats", "upgrade", "--print-capabilities", "--version", "-V", "--help", "-h"}


def module_roots() -> list[str] | None:
    """The sys.path entries MODULES were found in, in sys.path order; None if one is
    missing (then the re-executed interpreter could not start, so we do not try)."""
    roots: set[str] = set()
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return None
        where = os.path.dirname(os.path.abspath(spec.origin))
        if spec.submodule_search_locations is not None:  # a package: its parent directory
            where = os.path.dirname(where)
        roots.add(where)
    ordered = [p for p in map(os.path.abspath, filter(None, sys.path)) if p in roots]
    return list(dict.fromkeys(ordered + sorted(roots - set(ordered))))


def reexec_without_site(argv: list[str]) -> None:
    """Replace this process by ``python -S -P -OO -m supervisor ARGV``; returns only
    where that is not wanted or not possible."""
    if sys.flags.no_site or os.environ.get("PYVIRTIOFSD_SITE") == "1":
        return
    if NO_REEXEC.intersection(argv):
        return
    if not sys.executable:
        return
    roots = module_roots()
    if roots is None:
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(roots)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *FLAGS, "-m", "supervisor", *argv], env)


# ----- no TLS ------------------------------------------------------------------------

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


def _ssl_placeholder() -> types.ModuleType:
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


def install_no_tls() -> bool:
    """Import asyncio and uvloop without OpenSSL; True if the placeholder is in use."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False  # too late: whoever imported them first has the real module
    sys.modules["ssl"] = _ssl_placeholder()
    try:
        import asyncio  # noqa: F401

        import uvloop  # noqa: F401
    except (AttributeError, ImportError, TypeError):
        for name in [m for m in sys.modules if m == "ssl" or m.startswith(("asyncio", "uvloop"))]:
            del sys.modules[name]
        import uvloop  # noqa: F401 - with the real ssl this time

        return False
    return True


def uninstall_no_tls() -> None:
    """Give the real ``ssl`` back to a process that is not the daemon (``pyvirtiofsd
    stats``, whose prometheus_client reads ssl's names at import time). asyncio and uvloop
    keep the placeholder they imported; such a process never uses them for TLS."""
    mod = sys.modules.get("ssl")
    if mod is not None and getattr(mod, "pyvirtiofsd_placeholder", False):
        del sys.modules["ssl"]
