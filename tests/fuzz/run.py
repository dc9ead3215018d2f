"""The fuzzer's command line.

    python3 -m tests.fuzz.run --time 60                 # CI-sized
    python3 -m tests.fuzz.run --requests 1000000        # the long run
    python3 -m tests.fuzz.run --repro fuzz-findings/identity-1a2b3c.bin --repeat 20

libFuzzer (through atheris) mutates the inputs, guided by the daemon's own line/edge
coverage (tests.fuzz.covtrace); ``--random`` feeds random inputs instead (no atheris
needed). Each finding is printed when it happens, with its reproducer saved under
``--findings`` (default ./fuzz-findings, kept out of git); the daemon instance is then
replaced and fuzzing goes on. A status line every ``--status`` seconds and a summary at
the end give inputs, requests (and per second), invariant checks, edges and lines
covered, and the findings by kind with the time to the first of each. The exit status
is 1 if anything was found.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz import checks, covtrace
from tests.fuzz.guest import Finding
from tests.fuzz.harness import ACTIONS, CONFIGS, Instance, Program

REPO = Path(__file__).resolve().parents[2]
SEEDS = Path(__file__).resolve().parent / "corpus"
KEEP_PER_KIND = 5  # reproducers saved per kind of finding
MAX_DEATHS = 6  # worker deaths an instance may go on after
# findings after which the daemon cannot be trusted to go on: a fresh instance follows
HARD = {"worker-died", "daemon-exit", "blocked", "no-reply", "setlkw", "used-ring", "reply",
        "exception", "identity"}


@dataclass
class Found:
    kind: str
    first_at: float
    first_input: int
    message: str
    reproducer: str
    config: int
    count: int = 0


@dataclass
class Stats:
    start: float = field(default_factory=time.monotonic)
    inputs: int = 0
    requests: int = 0
    checks: int = 0
    instances: int = 0
    harness_errors: int = 0


class Fuzzer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.findings_dir = Path(args.findings).resolve()
        self.findings_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="pyvfs-fuzz-"))
        self.cov_path = f"/dev/shm/pyvfs-fuzz-cov-{os.getpid()}"
        self.cov: covtrace.CoverageMap | None = None
        if not args.no_coverage:
            try:
                covtrace.load()  # compiled once; needs gcc and Python's headers
                self.cov = covtrace.CoverageMap(self.cov_path, create=True)
            except Exception as e:  # noqa: BLE001 - fuzz on without coverage
                print(f"fuzz: no coverage (the tracer does not build: {e}); inputs are "
                      "random", file=sys.stderr)
                args.no_coverage = True
        self.lines_table = covtrace.executable_lines()
        self.edges_seen = bytearray(covtrace.EDGES)
        self.c_edges_seen = bytearray(covtrace.C_EDGES)
        self.edge_count = 0
        self.c_edge_count = 0
        self.inst: Instance | None = None
        self.stats = Stats()
        self.found: dict[str, Found] = {}
        self.last_status = time.monotonic()
        self.base = -1
        self.start_failures = 0
        self.config_index = args.config if args.config is not None else 0

    # ----- instances ----------------------------------------------------------------

    def instance(self) -> Instance:
        if self.inst is None:
            if self.args.config is None:
                self.config_index = self.stats.instances % len(CONFIGS)
            self.stats.instances += 1
            self.inst = Instance(self.tmp / f"i{self.stats.instances}",
                                 CONFIGS[self.config_index],
                                 self.cov_path if self.cov is not None else None)
        return self.inst

    def drop_instance(self) -> None:
        if self.inst is not None:
            self.stats.requests += self.inst.guest.requests
            try:
                self.inst.close()
            except Exception:  # noqa: BLE001 - a broken instance is dropped anyway
                pass
            self.inst = None

    def retire(self, data: bytes) -> None:
        """End the instance as a crash would: SIGKILL the supervisor; every worker must
        exit with it."""
        inst = self.inst
        if inst is None:
            return
        alive = inst.guest.kill_supervisor()
        if alive:
            self.record(Finding("orphan-workers", f"worker(s) {alive} still running 2 s after "
                                "their supervisor was killed (SIGKILL)"), data)
        self.drop_instance()

    def requests(self) -> int:
        return self.stats.requests + (self.inst.guest.requests if self.inst else 0)

    # ----- one input ----------------------------------------------------------------

    def one_input(self, data: bytes) -> Finding | None:
        """Run one input; returns the finding, if any (recorded and saved already)."""
        try:
            inst = self.instance()
        except Exception as e:  # noqa: BLE001 - a daemon that does not start
            self.stats.harness_errors += 1
            self.start_failures += 1
            print(f"fuzz: the daemon did not start: {e!r}", file=sys.stderr, flush=True)
            if self.start_failures >= 3:
                print("fuzz: the daemon failed to start 3 times in a row; stopping",
                      flush=True)
                self.finish()
            return None
        self.start_failures = 0
        inst.history.append(data)
        if self.cov is not None:
            self.cov.clear_edges()
        prog = Program(inst, data)
        finding: Finding | None = None
        try:
            prog.run()
        except Finding as f:
            finding = f
        except Exception as e:  # noqa: BLE001 - a harness error must not end a long run
            if inst.guest.proc.poll() is not None:
                finding = Finding("daemon-exit", f"the daemon exited "
                                  f"({inst.guest.proc.returncode}) under the input: {e!r}")
            else:
                self.stats.harness_errors += 1
                print(f"fuzz: harness error (instance replaced): {e!r}\n"
                      f"{traceback.format_exc()}", file=sys.stderr, flush=True)
                self.drop_instance()
                return None
        self.stats.inputs += 1
        inst.inputs += 1
        self.stats.checks += prog.checks
        self.fold_coverage()
        if finding is not None:
            self.record(finding, data)
            self.recover(prog, finding)
        else:
            try:
                inst.reset_share()
            except Exception as e:  # noqa: BLE001 - a fresh instance makes a fresh share
                print(f"fuzz: share reset failed ({e!r}); instance replaced", file=sys.stderr)
                self.drop_instance()
            if inst.inputs >= self.args.restart_every:
                self.retire(data)
        self.status()
        return finding

    def recover(self, prog: Program, finding: Finding) -> None:
        """Keep the instance after a finding that left the daemon serving (a restart
        costs a second); otherwise, or if it does not come back clean, replace it."""
        inst = self.inst
        if inst is None:
            return
        if finding.kind.startswith("worker-died"):
            # the supervisor replaces a dead worker (and the new one answers what the old
            # one had popped), but only 20 times per queue: go on for a few deaths
            inst.deaths += 1
            if inst.deaths > MAX_DEATHS:
                self.drop_instance()
                return
        elif finding.kind in HARD:
            self.drop_instance()
            return
        try:
            prog.recover()
            inst.reset_share()
            if finding.kind.startswith("fd-"):  # known now: do not report it again
                inst.baseline.update({i.fd: i.target for i in checks.list_fds(
                    inst.guest.proc.pid)})
        except Exception:  # noqa: BLE001 - whatever went wrong, a fresh daemon follows
            self.drop_instance()

    def fold_coverage(self) -> None:
        """The daemon's edges of this input into libFuzzer's counters: one counter per
        edge, bumped 1, 2, 3, 4 or 8 times by its hit count (libFuzzer's own buckets)."""
        if self.cov is None:
            return
        trace = None
        if self.base >= 0:
            import atheris

            trace = atheris._trace_branch
        for edges, seen, base in ((self.cov.edges(), self.edges_seen, self.base),
                                  (self.cov.c_edges(), self.c_edges_seen,
                                   self.base + covtrace.EDGES)):
            for m in re.finditer(rb"[^\x00]", edges):
                i = m.start()
                if not seen[i]:
                    seen[i] = 1
                if trace is not None:
                    c = edges[i]
                    for _ in range(c if c < 4 else (4 if c < 8 else 8)):
                        trace(base + i)
        self.edge_count = len(self.edges_seen) - self.edges_seen.count(0)
        self.c_edge_count = len(self.c_edges_seen) - self.c_edges_seen.count(0)

    def lines(self) -> tuple[int, int]:
        if self.cov is None:
            return 0, 0
        return covtrace.lines_covered(self.cov.lines(), self.lines_table)

    def record(self, f: Finding, data: bytes) -> None:
        digest = hashlib.sha1(data).hexdigest()[:12]
        path = self.findings_dir / f"{f.kind}-{digest}.bin"
        known = self.found.get(f.kind)
        if known is not None and known.count >= KEEP_PER_KIND:
            known.count += 1  # enough reproducers of this kind: count it only
            return
        path.write_bytes(data)
        if self.inst is not None and len(self.inst.history) > 1:
            # the inputs this daemon instance ran before, in order: a finding that needs
            # their leftovers replays from these (--repro FILE.seq)
            path.with_suffix(".seq").write_bytes(b"".join(
                len(d).to_bytes(4, "little") + d for d in self.inst.history))
        log = ""
        if self.inst is not None:
            log = self.inst.guest.log_text()[-6000:]
        inputs = self.inst.inputs - 1 if self.inst is not None else 0
        without = f" --without {self.args.without}" if self.args.without else ""
        path.with_suffix(".txt").write_text(
            f"{f.kind}: {f.message}\nconfig: {' '.join(CONFIGS[self.config_index])}\n"
            f"inputs the daemon instance ran before: {inputs}\n"
            f"replay: python3 -m tests.fuzz.run --repro {path} --config {self.config_index}"
            f" --repeat 20{without}\n(or {path.with_suffix('.seq')} for the inputs before "
            f"it too)\n\nthe end of the daemon's log:\n{log}")
        elapsed = time.monotonic() - self.stats.start
        known = self.found.get(f.kind)
        if known is None:
            known = self.found[f.kind] = Found(f.kind, elapsed, self.stats.inputs, f.message,
                                               str(path), self.config_index)
            print(f"\nfuzz: FINDING {f.kind} after {elapsed:.1f} s, input "
                  f"{self.stats.inputs}, {self.requests()} requests "
                  f"(config {self.config_index}):\n  {f.message}\n  reproducer: {path}\n"
                  f"  replay: python3 -m tests.fuzz.run --repro {path} --config "
                  f"{self.config_index} --repeat 20"
                  + (f" --without {self.args.without}" if self.args.without else "")
                  + "\n", flush=True)
        known.count += 1

    # ----- reporting and stopping ------------------------------------------------------

    def status(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last_status < self.args.status:
            self.check_stop()
            return
        self.last_status = now
        elapsed = now - self.stats.start
        reqs = self.requests()
        hit, total = self.lines()
        print(f"fuzz: {elapsed:7.1f} s  inputs {self.stats.inputs}  requests {reqs} "
              f"({reqs / max(elapsed, 1e-9):.0f}/s)  checks {self.stats.checks}  edges "
              f"{self.edge_count}+{self.c_edge_count} C  lines {hit}/{total}  findings "
              f"{sum(f.count for f in self.found.values())} ({len(self.found)} kinds)",
              flush=True)
        if not final:
            self.check_stop()

    def check_stop(self) -> None:
        elapsed = time.monotonic() - self.stats.start
        if (self.args.time and elapsed >= self.args.time) or (
                self.args.requests and self.requests() >= self.args.requests) or (
                self.args.stop_on_finding and self.found):
            self.finish()

    def finish(self) -> None:
        if self.inst is not None and self.inst.history:
            self.retire(self.inst.history[-1])
        self.status(final=True)
        print("fuzz: summary")
        print(f"  inputs {self.stats.inputs}, requests {self.stats.requests}, invariant "
              f"checks {self.stats.checks}, daemon instances {self.stats.instances}, harness "
              f"errors {self.stats.harness_errors}")
        hit, total = self.lines()
        print(f"  coverage: {self.edge_count} Python edges, {hit} of {total} lines of "
              f"daemon/, workers/, shm_table/, supervisor.py; {self.c_edge_count} C edges "
              "of daemon/native/_sys (the C core in daemon/native/*.c)")
        for f in sorted(self.found.values(), key=lambda f: f.first_at):
            print(f"  FOUND {f.kind} x{f.count}: first after {f.first_at:.1f} s (input "
                  f"{f.first_input}, config {f.config})\n    {f.message.splitlines()[0]}\n"
                  f"    {f.reproducer}")
        if not self.found:
            print("  no invariant broken")
        sys.stdout.flush()
        sys.stderr.flush()
        if self.cov is not None:
            self.cov.unlink()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        os._exit(1 if self.found else 0)


def seed_inputs() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SEEDS.glob("*")) if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.fuzz.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", type=float, default=0, help="stop after this many seconds")
    p.add_argument("--requests", type=int, default=0, help="stop after this many requests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--findings", default=str(REPO / "fuzz-findings"),
                   help="where reproducers go (default ./fuzz-findings)")
    p.add_argument("--corpus", help="libFuzzer's working corpus (default: a temporary "
                   "copy of tests/fuzz/corpus)")
    p.add_argument("--random", action="store_true", help="random inputs, no atheris")
    p.add_argument("--no-coverage", action="store_true", help="run the daemon untraced")
    p.add_argument("--config", type=int, choices=range(len(CONFIGS)),
                   help="one daemon configuration only (default: alternate)")
    p.add_argument("--restart-every", type=int, default=200,
                   help="inputs per daemon instance")
    p.add_argument("--status", type=float, default=10, help="seconds between status lines")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--stop-on-finding", action="store_true")
    p.add_argument("--without", default="", help="actions to leave out, comma-separated "
                   f"(of {', '.join(sorted(set(ACTIONS)))}); e.g. mem while a known memory-"
                   "table bug would hide the others")
    p.add_argument("--repro", help="replay one saved input")
    p.add_argument("--repeat", type=int, default=1, help="with --repro: tries")
    args = p.parse_args(argv)
    left_out = {a for a in args.without.split(",") if a}
    if left_out - set(ACTIONS):
        p.error(f"--without: unknown actions {sorted(left_out - set(ACTIONS))}")
    Program.actions = [a for a in ACTIONS if a not in left_out]

    if args.repro:
        raw = Path(args.repro).read_bytes()
        inputs = [raw]
        if args.repro.endswith(".seq"):
            inputs, pos = [], 0
            while pos + 4 <= len(raw):
                n = int.from_bytes(raw[pos : pos + 4], "little")
                inputs.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
        args.findings = tempfile.mkdtemp(prefix="pyvfs-repro-")
        args.no_coverage = True
        fz = Fuzzer(args)
        stem = Path(args.repro).stem  # KIND-SHA (a finding) or found-KIND (a seed)
        kind = stem[len("found-"):] if stem.startswith("found-") else stem.rsplit("-", 1)[0]
        for attempt in range(args.repeat):
            for data in inputs:
                f = fz.one_input(data)
                if f is not None and f.kind == kind:
                    print(f"fuzz: reproduced on try {attempt + 1}: [{f.kind}] {f.message}")
                    fz.finish()
                if f is not None:
                    print(f"fuzz: try {attempt + 1} found {f.kind}, not {kind}; going on")
            fz.drop_instance()  # each try from a fresh daemon
        print(f"fuzz: not reproduced in {args.repeat} tries")
        fz.finish()
        return 0

    fz = Fuzzer(args)
    if not args.random and importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed (pip install atheris); inputs are random",
              file=sys.stderr)
        args.random = True
    if args.random or args.no_coverage:
        rng = random.Random(args.seed)
        for data in seed_inputs():
            fz.one_input(data)
        while True:
            fz.one_input(rng.randbytes(rng.randrange(16, args.max_len)))

    import atheris

    fz.base = atheris._reserve_counter()
    for _ in range(covtrace.EDGES + covtrace.C_EDGES - 1):  # Python edges, then C edges
        atheris._reserve_counter()
    corpus = args.corpus
    if corpus is None:
        corpus = str(fz.tmp / "corpus")
        os.makedirs(corpus)
        for i, data in enumerate(seed_inputs()):
            Path(corpus, f"seed-{i}").write_bytes(data)
    lf = [sys.argv[0], corpus, f"-seed={args.seed}", f"-max_len={args.max_len}",
          "-rss_limit_mb=0", "-timeout=120", "-print_final_stats=0", "-len_control=0",
          f"-artifact_prefix={fz.findings_dir}/libfuzzer-", "-reload=0"]
    atheris.Setup(lf, lambda data: fz.one_input(data) and None)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
