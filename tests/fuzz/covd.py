"""The daemon under coverage: ``python -m tests.fuzz.covd MAP -- <pyvirtiofsd options>``.

Installs the line tracer of tests.fuzz.covtrace (inherited by every worker the daemon
clones) and daemon/native/_sys built with gcc's basic-block coverage in place of the plain one,
asks for SIGKILL when the fuzzer that started it dies, and runs the daemon's own
``main`` with the options given, unchanged. ``main`` gets its argv explicitly, so it
does not re-execute itself without site (which would drop the tracer)."""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m tests.fuzz.covd MAP -- OPTIONS...", file=sys.stderr)
        return 2
    from tests.fuzz import covtrace

    if argv[0] != "-":
        cov = covtrace.start_tracing(argv[0])
        covtrace.install_c_coverage(cov)  # before anything imports daemon.native._sys
    from daemon.native._sys import lib

    lib.pyvfs_set_pdeathsig(signal.SIGKILL)
    import supervisor

    return supervisor.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
