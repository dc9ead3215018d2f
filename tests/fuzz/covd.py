"""The daemon under coverage: ``python -m tests.fuzz.covd MAP -- <pyvirtiofsd options>``.

Installs the line tracer of tests.fuzz.covtrace (inherited by every worker the daemon
clones), asks for SIGKILL when the fuzzer that started it dies, and runs the daemon's own
``main`` with the options given, unchanged. ``main`` gets its argv explicitly, so it
does not re-execute itself without site (which would drop the tracer)."""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m tests.fuzz.covd MAP -- OPTIONS...", file=sys.stderr)
        return 2
    from daemon._sys import lib
    from tests.fuzz import covtrace

    lib.pyvfs_set_pdeathsig(signal.SIGKILL)
    if argv[0] != "-":
        covtrace.start_tracing(argv[0])
    from daemon import cli

    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
