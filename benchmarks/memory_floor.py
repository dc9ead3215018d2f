"""The memory floor of the design: what CPython processes cost before pyvirtiofsd does anything.

    python3 -m benchmarks.memory_floor

Starts interpreters that only import something (nothing, uvloop, uvloop without OpenSSL,
the daemon's modules), fork N children that sleep, and reports the PSS summed over the
parent and its children (/proc/<pid>/smaps_rollup), as ``benchmarks.run`` measures a
daemon. pyvirtiofsd with one request queue is three such processes (supervisor,
high-priority worker, request worker); Rust virtiofsd's idle RSS is about 4.9 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.procmem import read_process  # noqa: E402
from daemon.host.lean_interpreter import module_roots  # noqa: E402

CASES = [
    ("bare interpreter (python3 -S: no site packages)", "pass", ["-S"]),
    ("bare interpreter with site packages", "pass", []),
    ("import uvloop (loads OpenSSL through ssl)", "import uvloop", []),
    ("import uvloop without OpenSSL (install_no_tls)",
     "from daemon.host import lean_interpreter; lean_interpreter.install_no_tls()", []),
    ("the daemon's modules, without OpenSSL",
     "import supervisor, daemon.options, "
     "workers.queue_worker", []),
    # as the daemon runs since it re-executes itself without site (daemon/host/lean_interpreter.py)
    ("import uvloop without OpenSSL, no site (-S -P)",
     "from daemon.host import lean_interpreter; lean_interpreter.install_no_tls()",
     ["-S", "-P"]),
    ("the daemon's modules, without OpenSSL, no site (-S -P)",
     "import supervisor, daemon.options, "
     "workers.queue_worker", ["-S", "-P"]),
    # as the daemon runs since it also drops docstrings (daemon/host/no_site.py FLAGS)
    ("the daemon's modules, as the daemon runs (-S -P -OO)",
     "import supervisor, daemon.options, "
     "workers.queue_worker", ["-S", "-P", "-OO"]),
]

CHILD = """
import os, sys, time
{code}
kids = []
for _ in range({children}):
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
print(" ".join(map(str, [os.getpid(), *kids])), flush=True)
sys.stdin.read()
for k in kids:
    os.kill(k, 9)
"""


def pss_kb(pids: list[str]) -> int:
    procs = [read_process(int(pid), "") for pid in pids]
    assert all(procs), f"a process of {pids} is gone"
    return sum(m.pss for m in procs if m)


def measure(code: str, flags: list[str], children: int) -> float:
    env = dict(os.environ)
    if "-S" in flags:  # the daemon's own module path, as daemon/host/lean_interpreter.py sets it
        env["PYTHONPATH"] = os.pathsep.join(module_roots() or [])
    proc = subprocess.Popen([sys.executable, *flags, "-c",
                             CHILD.format(code=code, children=children)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None and proc.stdin is not None
    pids = proc.stdout.readline().split()
    time.sleep(0.5)
    try:
        return pss_kb(pids) / 1024
    finally:
        proc.stdin.close()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=2,
                    help="forked children besides the parent (default 2: one request queue)")
    args = ap.parse_args()
    print(f"PSS in MB, summed over 1 process and over 1 + {args.children} forked processes")
    print(f"{'':58} {'1 process':>10} {1 + args.children:>3} processes")
    for label, code, flags in CASES:
        one = measure(code, flags, 0)
        many = measure(code, flags, args.children)
        print(f"{label:58} {one:10.1f} {many:13.1f}")
    print(f"(machine: {os.uname().release}, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
