"""``pyvirtiofsd upgrade --socket-path S``: make a running daemon execute the code
installed now, under its running guest, and say whether it worked.

Finds the daemon by its pid file (``S.pid``), sends it SIGHUP (what ``systemctl reload``
does through the unit's ``ExecReload=``), and waits until the daemon's info segment
(daemon/stats/daemon_info.py) says the new program serves: one more live upgrade, and
serving. Prints the build ids before and after; exits 1 with the reason otherwise (no
daemon, it died, or it did not finish within ``--timeout``; its log says why).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from daemon.stats.daemon_info import read_info


def daemon_pid(socket_path: str) -> int:
    path = socket_path + ".pid"
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise SystemExit(f"pyvirtiofsd upgrade: no daemon pid in {path}: {e}") from None


def main(argv: list[str]) -> int:
    # no docstrings under python -OO, as the daemon itself runs
    summary = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="pyvirtiofsd upgrade", description=summary)
    p.add_argument("--socket-path", required=True, help="the daemon's --socket-path")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the new code to serve (default 30)")
    args = p.parse_args(argv)
    pid = daemon_pid(args.socket_path)
    before = read_info(pid)
    if not before:
        print(f"pyvirtiofsd upgrade: daemon {pid} publishes no info segment "
              f"(/pyvirtiofsd-{pid}-info): not running, or a version without live "
              "upgrade", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"pyvirtiofsd upgrade: daemon {pid} is not running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"pyvirtiofsd upgrade: daemon {pid} exited during the upgrade; see its "
                  "log", file=sys.stderr)
            return 1
        now = read_info(pid)
        if now.get("upgrades", 0) > before.get("upgrades", 0) and now.get("serving"):
            print(f"pyvirtiofsd {pid}: code {before.get('build')} -> {now.get('build')}, "
                  f"live upgrade {now['upgrades']}, serving")
            return 0
    print(f"pyvirtiofsd upgrade: daemon {pid} did not serve new code within "
          f"{args.timeout:g} s (it goes on with the old code if the upgrade failed; see "
          "its log)", file=sys.stderr)
    return 1
