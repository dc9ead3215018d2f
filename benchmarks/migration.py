"""Guest pause of a live migration with pyvirtiofsd and with Rust virtiofsd 1.13.2, in the
same harness on the same machine, interleaved.

    python3 -m benchmarks.migration [--rounds 3] [--hops 3] [--files 300,3000]

Each boot is a 6.12 guest (QEMU 10, TCG, one vCPU, one request queue: Rust virtiofsd serves
one) running ``migholder`` (tests/support/live_migration/holder.c) on the share: held files of each
kind, a listing part way, a shared mapping, locks, O_DIRECT writes in flight, and ``--files``
files stat'ed (that many inodes the daemon must carry). The guest is then migrated ``--hops``
times between fresh daemons on the same share, each hop followed by a check that every held
fd still works. Per hop:

- guest pause: the source QEMU's STOP event to the destination's RESUME event (QMP event
  timestamps, one host clock);
- QEMU's ``downtime`` (query-migrate) and the whole migration's ``total-time``;
- from QEMU's trace points (``-trace``, log back-end): when each side sent GET_VRING_BASE,
  SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE and got their replies, and QEMU's own
  per-device save/load times (``vmstate_downtime_*``): where the pause goes.

Rounds are interleaved: pyvirtiofsd then Rust for each file count, the order swapped every
other round. Writes ``benchmarks/results/<date>-migration.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import RESULTS, machine_info
from tests.support import qemu10, reference
from tests.support.daemon import start_pyvirtiofsd
from tests.support.live_migration import holder as migholder
from tests.support.live_migration.hops import DaemonStarter, Hops
from tests.support.migrate import MigrationPair

KERNEL = "6.12"
TRACE_EVENTS = ("vhost_user_write", "vhost_user_read", "vmstate_downtime_save",
                "vmstate_downtime_load", "vmstate_downtime_checkpoint")
#: vhost-user requests of the switch-over (QEMU's docs/interop/vhost-user.rst numbers)
REQUESTS = {10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
            42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE", 18: "SET_VRING_ENABLE"}
DAEMONS = {"pyvirtiofsd": "pyvirtiofsd", "rust": "Rust virtiofsd"}


def start_rust(share: Path, sock: Path, on_error: str) -> subprocess.Popen[bytes]:
    """Rust virtiofsd with the same migration options (find-paths, the default)."""
    sock.unlink(missing_ok=True)
    log_path = Path(f"{sock}.log")
    cmd = [*reference.rust_command(), f"--socket-path={sock}", f"--shared-dir={share}",
           "--sandbox=none", "--migration-mode=find-paths", f"--migration-on-error={on_error}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc.log_path = log_path  # type: ignore[attr-defined]
    reference.wait_for_socket(proc, sock, timeout=10.0)
    return proc


def start_py(share: Path, sock: Path, on_error: str) -> subprocess.Popen[bytes]:
    return start_pyvirtiofsd(share, sock, "--migration-mode", "find-paths",
                             "--migration-on-error", on_error)


STARTERS: dict[str, DaemonStarter] = {"pyvirtiofsd": start_py, "rust": start_rust}

_TRACE_LINE = re.compile(r"^\d+@(\d+\.\d+):(\w+) (.*)$")


def trace_events(path: Path | None) -> list[tuple[float, str, str]]:
    """(time, event, arguments) from a QEMU log-back-end trace file."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _TRACE_LINE.match(line.strip())
        if m:
            out.append((float(m.group(1)), m.group(2), m.group(3)))
    return out


def switchover(src: list[tuple[float, str, str]], dst: list[tuple[float, str, str]],
               stop: float) -> dict[str, Any]:
    """Milliseconds from the guest's stop to each switch-over message's send and reply on
    both sides, and QEMU's per-device save/load times for the vhost-user-fs device."""
    out: dict[str, Any] = {}

    def mark(side: str, events: list[tuple[float, str, str]]) -> None:
        for t, name, args in events:
            if name in ("vhost_user_write", "vhost_user_read"):
                m = re.search(r"req:? ?(\d+)", args)
                req = REQUESTS.get(int(m.group(1))) if m else None
                if req is None:
                    continue
                what = "sent" if name == "vhost_user_write" else "answered"
                key = f"{side} {req} {what}"
                if t >= stop - 0.001:
                    out.setdefault(key + " first", round((t - stop) * 1e3, 1))
                    out[key + " last"] = round((t - stop) * 1e3, 1)
            elif (name in ("vmstate_downtime_save", "vmstate_downtime_load")
                  and "vhost-user-fs" in args and t >= stop - 0.001):
                m = re.search(r"downtime=(\d+)", args)
                if m:
                    out[f"{side} qemu {name.rsplit('_', 1)[1]} of the device (ms)"] = (
                        int(m.group(1)) / 1e3)
            elif name == "vmstate_downtime_checkpoint":
                if t >= stop - 0.001:
                    out[f"{side} checkpoint {args.strip()}"] = round((t - stop) * 1e3, 1)

    mark("src", src)
    mark("dst", dst)
    return out


def run_boot(kind: str, nfiles: int, hops_wanted: int, qemu: qemu10.Qemu) -> list[dict]:
    """One guest on ``kind``'s daemons, migrated ``hops_wanted`` times; one record a hop."""
    records = []
    with tempfile.TemporaryDirectory(prefix="pyvfs-migbench-") as tmp:
        work = Path(tmp)
        share = work / "share"
        migholder.prepare_share(share, nfiles)
        with MigrationPair(qemu, migholder.guest_script(nfiles), kernel=KERNEL,
                           files={migholder.GUEST_PATH: migholder.program()},
                           trace_events=TRACE_EVENTS) as pair:
            hops = Hops(pair, share, work, STARTERS[kind])
            try:
                hops.boot()
                holder = migholder.Holder(share)
                holder.report(0, 300, hops.describe)
                for hop in range(1, hops_wanted + 1):
                    src = hops.side
                    assert src is not None
                    started = time.monotonic()
                    info = hops.hop()
                    wall = time.monotonic() - started
                    if info.get("status") != "completed":
                        raise RuntimeError(f"{kind}: hop {hop}: {info}\n{hops.describe()}")
                    rep = holder.command("check", describe=hops.describe)
                    ok = (rep["rw_read"].rstrip() == f"ok:host-rw-{holder.seq}"
                          and rep["many_ino_changed"] == "0" and rep["many_errors"] == "0")
                    if not ok:
                        raise RuntimeError(f"{kind}: after hop {hop} the guest saw {rep}")
                    stop = _stop_time(src.trace)
                    marks = switchover(trace_events(src.trace), trace_events(hops.side.trace),
                                       stop)
                    records.append({
                        "daemon": kind, "files": nfiles, "hop": hop,
                        "pause_ms": round(info["guest_pause_ms"], 1),
                        "vcpu_pause_ms": marks.get("dst checkpoint dst-precopy-bh-vm-started"),
                        "downtime_ms": info.get("downtime"),
                        "total_ms": info.get("total-time"),
                        "wall_s": round(wall, 2),
                        "switchover": marks,
                    })
                    print(f"{kind:12s} {nfiles:5d} files hop {hop}: pause "
                          f"{records[-1]['pause_ms']:6.1f} ms, vCPUs stopped "
                          f"{records[-1]['vcpu_pause_ms']} ms, downtime "
                          f"{records[-1]['downtime_ms']} ms", flush=True)
                holder.command("finish", describe=hops.describe)
            finally:
                hops.close()
    return records


def _stop_time(trace: Path | None) -> float:
    """When the source stopped the guest: its 'src-downtime-start' checkpoint."""
    for t, name, args in trace_events(trace):
        if name == "vmstate_downtime_checkpoint" and "src-downtime-start" in args:
            return t
    return 0.0


def summarize(records: list[dict]) -> dict[str, dict[str, Any]]:
    cells: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = f"{rec['daemon']}|{rec['files']}"
        cells.setdefault(key, {"pause": [], "vcpu": [], "downtime": [], "total": [],
                               "switchover": []})
        cells[key]["pause"].append(rec["pause_ms"])
        cells[key]["vcpu"].append(rec["vcpu_pause_ms"])
        cells[key]["downtime"].append(rec["downtime_ms"])
        cells[key]["total"].append(rec["total_ms"])
        cells[key]["switchover"].append(rec["switchover"])
    return cells


def stats(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def switchover_table(cells: dict[str, dict[str, Any]]) -> list[str]:
    """Median of each switch-over mark per cell, ms after the guest stopped."""
    keys: list[str] = []
    for cell in cells.values():
        for so in cell["switchover"]:
            for k in so:
                if k not in keys:
                    keys.append(k)
    names = list(cells)
    lines = ["| mark (ms after the source stopped the guest; median) | " + " | ".join(
        n.replace("|", ", ") + " files" for n in names) + " |",
        "|---|" + "---|" * len(names)]
    for k in sorted(keys, key=lambda k: statistics.median(
            [so[k] for c in cells.values() for so in c["switchover"] if k in so])):
        row = []
        for n in names:
            vals = [so[k] for so in cells[n]["switchover"] if k in so]
            row.append(f"{statistics.median(vals):.1f}" if vals else "–")
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return lines


def report(records: list[dict], args: argparse.Namespace, qemu: qemu10.Qemu,
           wall: float) -> str:
    cells = summarize(records)
    info = machine_info()
    L = ["# Live migration: guest pause, pyvirtiofsd and Rust virtiofsd", "",
         f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with "
         f"`python3 -m benchmarks.migration --rounds {args.rounds} --hops {args.hops} "
         f"--files {args.files}` ({wall / 60:.1f} min).", "",
         f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, "
         f"kernel {info['kernel']}, {info['os']}. QEMU {'.'.join(map(str, qemu.version))} "
         f"({qemu.origin}), TCG. Guest: Linux {KERNEL}, 1 vCPU, 256 MiB, one request queue. "
         f"Rust: {reference.rust_version()}.", "",
         "Each boot: migholder holds its files, locks, mapping and listing and stats N files; "
         f"then {args.hops} hops between fresh daemons on one share (find-paths), each "
         "followed by a check through every held fd. Daemons interleaved per round.", "",
         "| daemon | inodes stat'ed | hops | guest pause ms (STOP to RESUME), median "
         "(min–max) | vCPUs stopped ms | QEMU downtime ms | migration total ms |",
         "|---|---|---|---|---|---|---|"]
    for key, cell in cells.items():
        kind, files = key.split("|")
        L.append(f"| {DAEMONS[kind]} | {files} | {len(cell['pause'])} | "
                 f"{stats(cell['pause'])} | {stats(cell['vcpu'])} | {stats(cell['downtime'])} | "
                 f"{stats(cell['total'])} |")
    L += ["", "Guest pause: the source's STOP event to the destination's RESUME event (QMP "
          "timestamps). QEMU sends STOP after it stopped the device (GET_VRING_BASE) and "
          "RESUME before it starts it (SET_VRING_*), so that span leaves out the daemons' "
          "ring stop and start; 'vCPUs stopped' is the whole span, from the source's "
          "src-downtime-start to the destination's dst-precopy-bh-vm-started trace "
          "checkpoints. Where it goes, from QEMU's trace points (sent = QEMU wrote the "
          "request, answered = QEMU read the reply; first/last over the rings):", ""]
    L += switchover_table(cells)
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hops", type=int, default=3)
    ap.add_argument("--files", default="300,3000")
    ap.add_argument("--daemons", default="pyvirtiofsd,rust")
    ap.add_argument("--out", default=None, help="report path (default results/<date>-migration.md)")
    args = ap.parse_args()
    qemu = qemu10.ensure_qemu()
    kinds = args.daemons.split(",")
    counts = [int(x) for x in args.files.split(",")]
    records: list[dict] = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]
        for nfiles in counts:
            for kind in order:
                records += run_boot(kind, nfiles, args.hops, qemu)
    wall = time.monotonic() - started
    out = Path(args.out) if args.out else RESULTS / f"{dt.date.today():%Y-%m-%d}-migration.md"
    out.write_text(report(records, args, qemu, wall))
    out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    print(out.read_text())
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
