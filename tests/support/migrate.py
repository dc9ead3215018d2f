"""Live-migrating a test guest between two QEMUs on this host, each with its own
pyvirtiofsd: the source boots the guest (tests/support/vm.py's command line), the
destination waits with ``-incoming``, and QMP moves the guest over a UNIX socket.

QEMU migrates a vhost-user-fs device only from 8.2 on (tests/support/qemu10.py finds one),
and refuses while a 9p export is mounted, so the guest runs busybox from its initramfs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import assets
from tests.support.qemu10 import Qemu
from tests.support.vm import _kill_group, qemu_command


class Qmp:
    """A minimal QMP client: one command at a time; events are kept in ``events`` (QEMU
    stamps each with the host's wall clock, so two QEMUs' events can be compared)."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        """The first event ``name`` received so far or within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP event {name} within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                line = self.file.readline()
            finally:
                self.sock.settimeout(self.timeout)
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)

    def execute(self, command: str, **arguments: object) -> object:
        req: dict[str, object] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Side:
    """One QEMU of the pair: its process, QMP socket and output files."""

    proc: subprocess.Popen[bytes]
    qmp_path: Path
    console: Path
    script_out: Path
    stderr: Path
    trace: Path | None = None  # QEMU's trace log (-D), with MigrationPair's trace_events

    def output(self) -> str:
        return self.script_out.read_bytes().decode("utf-8", "replace")

    def console_text(self) -> str:
        return self.console.read_bytes().decode("utf-8", "replace")

    def describe(self) -> str:
        return (f"--- qemu stderr ---\n{self.stderr.read_text(errors='replace')}\n"
                f"--- console ---\n{self.console_text()}\n--- script ---\n{self.output()}")


class MigrationPair:
    """Source and destination QEMU for one guest script; always killed on exit."""

    def __init__(self, qemu: Qemu, script: str, *, kernel: str = "6.1",
                 num_request_queues: int = 1, smp: int = 1, memory_mb: int = 256,
                 tag: str = "myfs", files: dict[str, bytes] | None = None,
                 trace_events: Sequence[str] = ()) -> None:
        """``files``: guest path -> contents added to the initramfs (programs: the guest
        cannot take them from the host over 9p); ``trace_events``: QEMU trace points each
        side logs to ``Side.trace`` (benchmarks: where the switch-over's time goes)."""
        self.trace_events = tuple(trace_events)
        self.qemu = qemu
        self.kassets = assets.ensure_kernel(kernel)
        self.base = assets.build_initramfs(self.kassets, files)
        self.tmp = tempfile.TemporaryDirectory(prefix="pyvfs-migrate-")
        self.work = Path(self.tmp.name)
        self.initrd = self.work / "initrd.cpio"
        self.initrd.write_bytes(self.base.read_bytes() + assets.build_run_archive(script))
        self.options = {"tag": tag, "num_request_queues": num_request_queues, "smp": smp,
                        "memory_mb": memory_mb}
        self.sides: list[Side] = []

    def start(self, name: str, socket_path: Path, incoming: str | None = None) -> Side:
        script_out = self.work / f"{name}.script"
        script_out.touch()
        cmd = qemu_command(kernel=self.kassets, initrd=self.initrd, socket_path=socket_path,
                           script_out=script_out, queue_size=1024, host_root_9p=False,
                           qemu=self.qemu, **self.options)  # type: ignore[arg-type]
        qmp = self.work / f"{name}.qmp"
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", incoming]
        trace = self.work / f"{name}.trace" if self.trace_events else None
        for event in self.trace_events:
            cmd += ["-trace", f"enable={event}"]
        if trace is not None:
            cmd += ["-D", str(trace), "-msg", "timestamp=on"]  # pid@seconds: per line
        console, stderr = self.work / f"{name}.console", self.work / f"{name}.stderr"
        with open(console, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, env=self.qemu.env())
        side = Side(proc, qmp, console, script_out, stderr, trace)
        self.sides.append(side)
        return side

    def migrate(self, source: Side, uri: str, timeout: float = 120,
                destination: Side | None = None) -> dict:
        """Move the guest; returns query-migrate's last answer (status completed). With
        ``destination``, both sides use the return path, so the source hears when the
        destination fails to load (and resumes the guest) instead of completing; and on
        success the answer gains ``guest_pause_ms``: from the source's STOP event to the
        destination's RESUME event (QMP timestamps, one host clock)."""
        qmp = Qmp(source.qmp_path)
        dst = Qmp(destination.qmp_path) if destination is not None else None
        try:
            if dst is not None:
                caps = [{"capability": "return-path", "state": True}]
                dst.execute("migrate-set-capabilities", capabilities=caps)
                qmp.execute("migrate-set-capabilities", capabilities=caps)
            qmp.execute("migrate", uri=uri)
            deadline = time.monotonic() + timeout
            while True:
                info = qmp.execute("query-migrate")
                assert isinstance(info, dict)
                status = info.get("status")
                if status in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"migration still {status} after {timeout} s")
                time.sleep(0.05)
            if status == "completed":
                if dst is not None:
                    stopped = qmp.wait_event("STOP")
                    resumed = dst.wait_event("RESUME")
                    info["guest_pause_ms"] = (_event_time(resumed) - _event_time(stopped)) * 1e3
                qmp.execute("quit")
            return info
        finally:
            qmp.close()
            if dst is not None:
                dst.close()

    def close(self) -> None:
        for side in self.sides:
            _kill_group(side.proc)
        self.tmp.cleanup()

    def __enter__(self) -> MigrationPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event_time(event: dict) -> float:
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def wait_for(predicate, timeout: float, what: str, describe=lambda: "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s\n{describe()}")
        time.sleep(0.1)
