"""Helpers to run test code in forked processes and collect results through a pipe."""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any


class Child:
    """A forked process running fn(); its pickled return value (or traceback) comes back."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(r)
            code = 0
            try:
                payload = ("ok", fn())
            except BaseException:  # noqa: BLE001 - report everything to the parent
                payload = ("error", traceback.format_exc())
                code = 1
            data = pickle.dumps(payload)
            with os.fdopen(w, "wb") as f:
                f.write(data)
            os._exit(code)
        os.close(w)
        self._r = r

    def result(self) -> Any:
        with os.fdopen(self._r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        if not data:
            raise AssertionError(f"child {self.pid} died without a result (status {status})")
        kind, value = pickle.loads(data)
        if kind != "ok":
            raise AssertionError(f"child {self.pid} failed:\n{value}")
        return value
