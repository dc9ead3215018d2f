"""The command server inside the systemd test VM (tests/support/systemd/vm.py).

Runs as ``pyvfs-agent.service`` under the VM's systemd and answers the host over a
virtio-serial port, one JSON object a line each way. Two kinds of command:

- ``{"id": N, "sh": "...", "timeout": T}``: a shell command; the answer carries its exit
  status and its output (stdout and stderr merged);
- ``{"id": N, "py": "..."}``: Python run in one namespace that lives as long as the agent,
  so a test can open a front-end (tests/support/frontend.py) in one command and use it in
  the next while systemd restarts the daemon under it. The value of a final expression
  comes back (as JSON where it can be, else its repr); an exception comes back as its
  traceback with ``"error"``.

Why a server rather than a serial shell: exit status and output come back exactly, with
no prompt to parse and no echo, and Python state survives between commands.
Standard library only at import: it starts from the host's root over 9p under TCG.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import traceback

PORT_NAME = "pyvfs.agent"


def find_port(name: str = PORT_NAME, timeout: float = 60) -> str:
    """/dev/vportNpM of the virtio-serial port called ``name`` (no udev in the VM, so no
    /dev/virtio-ports/ links: the name is in sysfs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for port in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{port}/name") as fh:
                    if fh.read().strip() == name and os.path.exists(f"/dev/{port}"):
                        return f"/dev/{port}"
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no virtio-serial port named {name}")
        time.sleep(0.05)


def run_shell(command: str, timeout: float) -> dict[str, object]:
    try:
        done = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        return {"rc": None, "out": out, "error": f"timed out after {timeout} s"}
    return {"rc": done.returncode, "out": done.stdout.decode(errors="replace")}


def run_python(code: str, namespace: dict[str, object]) -> dict[str, object]:
    try:
        tree = ast.parse(code)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<host>", "exec"), namespace)
        value = eval(compile(last, "<host>", "eval"), namespace) if last else None
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        return {"error": traceback.format_exc()}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        value = repr(value)
    return {"value": value}


def main() -> int:
    port = find_port()
    fd = os.open(port, os.O_RDWR)
    reader = os.fdopen(fd, "rb", buffering=0)
    namespace: dict[str, object] = {"__name__": "__agent__"}
    os.write(fd, b'{"ready": true}\n')
    buffer = b""
    while True:
        chunk = reader.read(65536)
        if not chunk:  # host not connected yet, or gone: virtio-serial reads 0
            time.sleep(0.05)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            start = time.monotonic()
            if "sh" in request:
                answer = run_shell(request["sh"], request.get("timeout", 120))
            else:
                answer = run_python(request["py"], namespace)
            answer["id"] = request["id"]
            answer["seconds"] = round(time.monotonic() - start, 3)
            data = json.dumps(answer).encode() + b"\n"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYVFS_TREE", os.getcwd()))
    sys.exit(main())
