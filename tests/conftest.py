"""Shared pytest configuration for pyvirtiofsd's tests."""

import sys
import threading
import traceback

import pytest

# thread -> the test during which it was first seen (set up, run or torn down)
_first_seen: dict[threading.Thread, str] = {}
# how long a thread left at the end may take to finish before it counts as left behind
_EXIT_GRACE_S = 2.0


def pytest_configure(config: pytest.Config) -> None:
    """Register markers so ``-m guest`` / ``-m 'not guest'`` select the slow QEMU tests."""
    config.addinivalue_line(
        "markers", "guest: end-to-end test that boots a Linux guest under QEMU (slow, needs root)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Threads alive before the first test (started while collecting) are no test's."""
    for thread in threading.enumerate():
        _first_seen.setdefault(thread, "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Note the threads each test (with its fixtures) started, to name it if one is left."""
    yield
    for thread in threading.enumerate():
        _first_seen.setdefault(thread, item.nodeid)


def left_threads() -> list[tuple[threading.Thread, str]]:
    """Threads the tests started that are still alive after a short grace: a helper that
    starts a thread must stop and join it when it is closed, or the thread stays blocked
    (in recvmsg, a wait...) for the rest of the run and other tests' checks of this
    process's threads see it."""
    left = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or not _first_seen.get(thread):
            continue
        thread.join(_EXIT_GRACE_S)
        if thread.is_alive():
            left.append((thread, _first_seen[thread]))
    return left


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a thread running."""
    left = left_threads()
    if not left:
        return
    frames = sys._current_frames()
    lines = ["", f"{len(left)} thread(s) left running by tests:"]
    for thread, nodeid in left:
        lines.append(f"- {thread.name} (daemon={thread.daemon}), started by {nodeid}:")
        frame = frames.get(thread.ident or 0)
        if frame is not None:
            lines += ["    " + line for entry in traceback.format_stack(frame)[-2:]
                      for line in entry.rstrip().splitlines()]
    print("\n".join(lines), file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
