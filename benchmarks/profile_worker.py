"""Profile a pyvirtiofsd request-queue worker under the load generator with py-spy.

    pip install py-spy   # once
    python3 -m benchmarks.profile_worker [--workload getattr] [--qd 16] [--seconds 8]

Starts pyvirtiofsd on a tmpfs share, drives one request queue, samples the queue-1 worker
(``py-spy record --format raw``, GIL-holding and idle samples kept apart), and prints the
functions with the most self and inclusive samples. The raw stacks are kept next to the
output (``--out``) for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.loadgen import LoadGen
from benchmarks.run import make_shares
from tests.support.reference_daemons import make, process_tree


def worker_pids(supervisor: int) -> list[int]:
    return [p for p in process_tree(supervisor) if p != supervisor]


def summarize(raw: Path, top: int) -> str:
    self_s: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        if "poll (" in leaf and "run (workers/queue_worker.py" in stack:
            idle += count
        self_s[leaf] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples, {idle} ({100 * idle / max(total, 1):.0f}%) idle in epoll", "",
             "self samples (% of all):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_s.most_common(top)]
    lines += ["", "inclusive samples (% of all):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="getattr")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="/tmp/pyvirtiofsd-profile")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy")
    if not pyspy:
        sys.exit("py-spy not found: pip install py-spy")
    share = make_shares(["tmpfs"])["tmpfs"]
    daemon = make("pyvirtiofsd")
    sock = Path("/tmp/pyvirtiofsd-profile.sock")
    proc = daemon.start(share, sock)
    try:
        gen = LoadGen(str(sock), 1)
        gen.run(args.workload, args.qd, 0.5)  # warm up
        workers = worker_pids(proc.pid)
        # queue 1's worker is the one that burns CPU; pick it by CPU time after warm-up
        def cpu(p: int) -> int:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            return int(f[11]) + int(f[12])

        target = max(workers, key=cpu)
        raw = Path(args.out + ".txt")
        spy = subprocess.Popen([pyspy, "record", "--pid", str(target), "--format", "raw",
                                "--rate", str(args.rate), "--duration", str(int(args.seconds)),
                                "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        box: dict[str, object] = {}
        t = threading.Thread(target=lambda: box.update(
            res=gen.run(args.workload, args.qd, args.seconds - 0.5)))
        t.start()
        t.join()
        spy.wait()
        gen.close()
        res = box["res"]
        print(f"{args.workload} QD{args.qd}: {res.ops_per_s:,.0f} ops/s "  # type: ignore[attr-defined]
              f"while profiling worker {target}")
        text = summarize(raw, args.top)
        Path(args.out + ".summary.txt").write_text(text)
        print(text)
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
