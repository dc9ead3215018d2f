"""Live upgrades and supervisor kills under a running guest: a Linux 6.12 guest with 2
request queues runs fio (with crc32c verification) and two integrity checkers (one per
vCPU: write a file, read it back, compare) while the host upgrades the daemon again and
again with ``pyvirtiofsd upgrade`` and, in turn, SIGKILLs its supervisor (with
``--sandbox chroot|namespace``: its keeper starts a new one, workers/handover/keeper.py).
Reports I/O errors, mismatches, and the longest stall each event caused, from the guest's
side: the checkers stamp every operation with
/proc/uptime (10 ms resolution), and an event's stall is the longest gap between two
operations of a checker (the largest gaps of a run, one per event, stand out from the
~tens of ms an operation takes under TCG).

    python3 -m benchmarks.upgrade_stalls --upgrades 10 --kills 10 --sandbox namespace

tests/e2e/test_live_upgrade.py runs the same with fewer events.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.guest import FIO_DIR, LOADER, fio_bundle
from tests.support.daemon import REPO, daemon_log, pyvirtiofsd
from tests.support.vm import GuestRun, run_guest

CHECKER = """
checker() {
  i=0; errs=0; mism=0
  while [ ! -e /mnt/stop ]; do
    f=/mnt/c$1.$((i % 40))
    want="checker $1 op $i $(cat /proc/uptime)"
    echo "$want" > $f || errs=$((errs+1))
    got=$(cat $f) || errs=$((errs+1))
    [ "$got" = "$want" ] || mism=$((mism+1))
    read up _ < /proc/uptime; echo $up >> /tmp/t$1
    i=$((i+1))
  done
  gap=$(awk 'NR>1{d=$1-p; if (d>m) m=d} {p=$1} END{printf "%d", m*1000}' /tmp/t$1)
  gaps=$(awk 'NR>1{printf "%d\\n", ($1-p)*1000} {p=$1}' /tmp/t$1 | sort -rn | head -12 \\
    | tr '\\n' ' ')
  echo "@@CHECKER $1 ops=$i errors=$errs mismatches=$mism max_gap_ms=$gap top_gaps_ms=$gaps@@"
}
"""


def guest_script(fio_seconds: int) -> str:
    fio = f"/{FIO_DIR}/{Path(LOADER).name} --library-path /{FIO_DIR} /{FIO_DIR}/fio"
    return CHECKER + f"""
mount -t virtiofs myfs /mnt || exit 1
echo "@@MOUNTED@@"
checker 1 & c1=$!
checker 2 & c2=$!
{fio} --name=verify --filename=/mnt/fio.data --size=8m --rw=randrw --bs=4k \\
  --ioengine=psync --verify=crc32c --verify_backlog=16 --time_based \\
  --runtime={fio_seconds} > /tmp/fio.log 2>&1
rc=$?
echo "@@FIO rc=$rc $(grep -o 'err= *[0-9]*' /tmp/fio.log | head -1 | tr -d ' ')@@"
grep -i "error\\|bad" /tmp/fio.log | head -5
while [ ! -e /mnt/stop ]; do sleep 0.2; done
wait $c1; wait $c2
dmesg | grep -i "virtio\\|fuse" | grep -iv "registered\\|loaded" | head -5
umount /mnt && echo "@@UNMOUNTED@@"
"""


@dataclass
class Result:
    run: GuestRun
    events: list[tuple[str, float, str]] = field(default_factory=list)  # kind, s, output
    log: str = ""

    def checkers(self) -> list[dict[str, str]]:
        return [dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
                | {"id": m.group(1), "top_gaps_ms": m.group(3).strip()}
                for m in re.finditer(r"@@CHECKER (\d) (.*?) top_gaps_ms=([\d ]*)@@",
                                     self.run.script_output)]

    def fio(self) -> str:
        m = re.search(r"@@FIO (.*?)@@", self.run.script_output)
        return m.group(1) if m else ""

    def handover_ms(self, kind: str = "upgrade") -> list[float]:
        """Daemon side: from the upgrade request (or the supervisor's death) to the new
        program taking the front-end over."""
        begin = ("live upgrade requested" if kind == "upgrade"
                 else "killed by signal 9; taking")
        out = []

        def secs(t: str) -> float:
            h, m, s = t.split(":")
            return (int(h) * 60 + int(m)) * 60 + float(s.replace(",", "."))
        stamps = [(secs(t), what) for t, what in re.findall(
            r"\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d,\d+) \w+ [\w.]+ \d+\] .*?(live upgrade "
            r"requested|killed by signal 9; taking|live upgrade: took over)", self.log)]
        start = None
        for t, what in stamps:
            if what in ("live upgrade requested", "killed by signal 9; taking"):
                start = t if what == begin else None
            elif start is not None:
                out.append(round((t - start) * 1000, 1))
                start = None
        return out

    def ring_stall_ms(self) -> list[float]:
        """Daemon side, a live upgrade that executed the new code while the workers
        served: from the old workers' stop to the new ones serving."""
        return [float(m) for m in re.findall(r"rings served by no worker for ([\d.]+) ms",
                                             self.log)]


def supervisor_pid(main_pid: int) -> int:
    """The supervisor: the first process under the daemon with two or more children (its
    workers)."""
    todo = [main_pid]
    while todo:
        pid = todo.pop(0)
        try:
            kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text()
                    .split()]
        except OSError:
            kids = []
        if len(kids) >= 2:
            return pid
        todo += kids
    raise RuntimeError(f"no supervisor under {main_pid}")


def kill_supervisor(main_pid: int) -> str:
    """SIGKILL the supervisor; returns once a new one serves."""
    from daemon.stats.daemon_info import read_info

    before = read_info(main_pid).get("supervisor_restarts", 0)
    victim = supervisor_pid(main_pid)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = read_info(main_pid)
        if info.get("supervisor_restarts", 0) > before and info.get("serving"):
            return f"supervisor {victim} killed; restart {info['supervisor_restarts']} serving"
        time.sleep(0.02)
    return f"supervisor {victim} killed; no new one within 20 s"


def run(upgrades: int, interval: float = 4.0, sandbox: str = "none",
        share: Path | None = None, kills: int = 0) -> Result:
    """Boot the guest; once it has mounted, upgrade ``upgrades`` times and kill the
    supervisor ``kills`` times (in turn), ``interval`` s apart; then let it stop."""
    with tempfile.TemporaryDirectory(prefix="pyvfs-upgrade-") as tmp:
        share = share or Path(tmp) / "share"
        share.mkdir(exist_ok=True)
        sock = Path(tmp) / "vfs.sock"
        result: Result | None = None
        events: list[tuple[str, float, str]] = []
        mounted = threading.Event()
        done = threading.Event()

        def on_output(text: str) -> None:
            if "@@MOUNTED@@" in text:
                mounted.set()

        with pyvirtiofsd(share, sock, "--sandbox", sandbox) as proc:

            def upgrader() -> None:
                if not mounted.wait(180):
                    return
                time.sleep(interval)
                both = min(upgrades, kills)  # in turn, then what is left of either
                plan = ["upgrade", "kill"] * both + ["upgrade"] * (upgrades - both) \
                    + ["kill"] * (kills - both)
                for kind in plan:
                    if done.is_set():
                        return
                    t = time.monotonic()
                    if kind == "upgrade":
                        out = subprocess.run(
                            [sys.executable, "-m", "supervisor", "upgrade", "--socket-path",
                             str(sock)], cwd=REPO, capture_output=True, text=True)
                        text = (out.stdout + out.stderr).strip()
                    else:
                        text = kill_supervisor(proc.pid)
                    events.append((kind, round(time.monotonic() - t, 3), text))
                    time.sleep(interval)
                (share / "stop").write_text("stop\n")

            thread = threading.Thread(target=upgrader)
            thread.start()
            try:
                fio_seconds = int(interval * (upgrades + kills + 1))
                guest = run_guest(sock, guest_script(fio_seconds), kernel="6.12",
                                  num_request_queues=2, smp=2, memory_mb=1024,
                                  timeout=240 + fio_seconds,
                                  initramfs_files=fio_bundle(), on_script_output=on_output)
            finally:
                done.set()
                (share / "stop").write_text("stop\n")
                thread.join()
            result = Result(guest, events, daemon_log(proc))
        return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upgrades", type=int, default=10)
    p.add_argument("--kills", type=int, default=0,
                   help="supervisor SIGKILLs (needs --sandbox chroot or namespace)")
    p.add_argument("--interval", type=float, default=4.0)
    p.add_argument("--sandbox", default="none", choices=["none", "chroot", "namespace"])
    p.add_argument("--compare", action="store_true",
                   help="a run whose upgrades stop the workers first (the older way), "
                   "then one whose workers serve while the new code starts")
    args = p.parse_args()
    if args.compare:
        codes = []
        for way in ("stop-workers-first", "workers-serve-meanwhile"):
            os.environ["PYVIRTIOFSD_UPGRADE"] = way
            print(f"==== upgrades: {way}")
            codes.append(report(run(args.upgrades, args.interval, args.sandbox)))
        return max(codes)
    return report(run(args.upgrades, args.interval, args.sandbox, kills=args.kills))


def report(r: Result) -> int:
    print(f"guest rc={r.run.rc} script {r.run.script_seconds} s")
    for kind, seconds, out in r.events:
        print(f"{kind}: {seconds:.3f} s  {out}")
    print("daemon side, upgrade request -> new program took the front-end over, ms:",
          r.handover_ms("upgrade"))
    print("daemon side, supervisor killed -> new supervisor took it over, ms:",
          r.handover_ms("kill"))
    print("daemon side, rings served by no worker (workers serve meanwhile), ms:",
          r.ring_stall_ms())
    for c in r.checkers():
        print(f"checker {c['id']}: ops={c['ops']} errors={c['errors']} "
              f"mismatches={c['mismatches']} longest gap {c['max_gap_ms']} ms; "
              f"largest gaps (ms): {c['top_gaps_ms']}")
    print(f"fio: {r.fio()}")
    if r.run.rc != 0:
        print(r.run.describe())
    return 0 if r.run.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
