"""Live upgrades under a running guest: a Linux 6.12 guest with 2 request queues runs fio
(with crc32c verification) and two integrity checkers (one per vCPU: write a file, read
it back, compare) while the host upgrades the daemon again and again with
``pyvirtiofsd upgrade``. Reports I/O errors, mismatches, and the longest stall each
event caused, from the guest's side: the checkers stamp every operation with
/proc/uptime (10 ms resolution), and an event's stall is the longest gap between two
operations of a checker (the largest gaps of a run, one per event, stand out from the
~tens of ms an operation takes under TCG).

    python3 -m benchmarks.upgrade_stalls --upgrades 10

tests/e2e/test_live_upgrade.py runs the same with fewer events.
"""

from __future__ import annotations

import argparse
import re
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

    def handover_ms(self) -> list[float]:
        """Daemon side: from the upgrade request to the new program's first worker."""
        out = []

        def secs(t: str) -> float:
            m, s = t.split(":")
            return int(m) * 60 + float(s.replace(",", "."))
        stamps = [(secs(t), what) for t, what in re.findall(
            r"\d{4}-\d\d-\d\d \d\d:(\d\d:\d\d,\d+) \w+ [\w.]+ \d+\] (live upgrade requested|"
            r"live upgrade: took over)", self.log)]
        start = None
        for t, what in stamps:
            if what == "live upgrade requested":
                start = t
            elif start is not None:
                out.append(round((t - start) * 1000, 1))
                start = None
        return out


def run(upgrades: int, interval: float = 4.0, sandbox: str = "none",
        share: Path | None = None) -> Result:
    """Boot the guest, upgrade ``upgrades`` times ``interval`` s apart once it has mounted,
    then let it stop and report."""
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
                for _ in range(upgrades):
                    if done.is_set():
                        return
                    t = time.monotonic()
                    out = subprocess.run(
                        [sys.executable, "-m", "supervisor", "upgrade", "--socket-path",
                         str(sock)], cwd=REPO, capture_output=True, text=True)
                    events.append(("upgrade", round(time.monotonic() - t, 3),
                                   (out.stdout + out.stderr).strip()))
                    time.sleep(interval)
                (share / "stop").write_text("stop\n")

            thread = threading.Thread(target=upgrader)
            thread.start()
            try:
                fio_seconds = int(interval * (upgrades + 1))
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
    p.add_argument("--interval", type=float, default=4.0)
    p.add_argument("--sandbox", default="none", choices=["none", "chroot", "namespace"])
    args = p.parse_args()
    r = run(args.upgrades, args.interval, args.sandbox)
    print(f"guest rc={r.run.rc} script {r.run.script_seconds} s")
    for kind, seconds, out in r.events:
        print(f"{kind}: {seconds:.3f} s  {out}")
    print("daemon hand-over (request -> new program's workers), ms:", r.handover_ms())
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
