"""SQLite written concurrently from the guest and from the host on the shared directory
stays consistent: fcntl locks forwarded (--posix-lock) and no guest page cache that could
serve stale pages after the host wrote (--cache never), the configuration an operator
would use for a database shared with the host.

Each transaction is BEGIN IMMEDIATE (RESERVED lock first), reads the row count and inserts
a row carrying it: if a lock ever failed to exclude the other side, two rows would carry the
same count. (Python's sqlite3 does not begin a transaction before a SELECT, so without the
explicit BEGIN the count would be read outside the transaction and could be stale for
reasons that have nothing to do with the file system.)"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from tests.support.daemon import pyvirtiofsd
from tests.support.vm import run_guest

ROWS = 150
TRANSACTION = """
def add(db, who, i):
    db.execute("begin immediate")
    try:
        n = db.execute("select count(*) from t").fetchone()[0]
        db.execute("insert into t values (?, ?, ?)", (who, i, n))
        db.execute("commit")
    except BaseException:
        db.execute("rollback")
        raise
"""
SCRIPT = f"""
mount -t virtiofs myfs /mnt || exit 1
hostrun python3 -c '
import sqlite3
{TRANSACTION}
db = sqlite3.connect("/mnt/shared.db", timeout=60, isolation_level=None)
open("/mnt/guest-started", "w").close()
for i in range({ROWS}):
    add(db, "guest", i)
db.close()
print("guest done")
'
umount /mnt
"""


@pytest.mark.guest
def test_sqlite_from_guest_and_host_at_once(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    path = share / "shared.db"
    with sqlite3.connect(path) as db:
        db.execute("create table t (who text, i integer, seen integer)")
    sock = tmp_path / "vfs.sock"
    host_error: list[BaseException] = []
    namespace: dict = {}
    exec(TRANSACTION, namespace)  # the same transaction the guest runs
    add = namespace["add"]

    def host_writer() -> None:
        try:
            while not (share / "guest-started").exists():
                threading.Event().wait(0.02)
            db = sqlite3.connect(path, timeout=60, isolation_level=None)
            for i in range(ROWS):
                add(db, "host", i)
                threading.Event().wait(0.05)  # the guest (under TCG) is far slower
            db.close()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            host_error.append(e)

    with pyvirtiofsd(share, sock, "--posix-lock", "--cache", "never"):
        writer = threading.Thread(target=host_writer)
        writer.start()
        run = run_guest(sock, SCRIPT, host_root_9p=True, timeout=400)
        writer.join(timeout=120)
    assert run.rc == 0, run.describe()
    assert run.script_output.strip() == "guest done"
    assert host_error == []
    with sqlite3.connect(path) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        rows = db.execute("select who, i, seen from t order by rowid").fetchall()
    assert sorted((w, i) for w, i, _ in rows) == sorted(
        [("guest", i) for i in range(ROWS)] + [("host", i) for i in range(ROWS)])
    # every transaction saw every row committed before it: no lost or stale read
    assert [seen for _, _, seen in rows] == list(range(2 * ROWS)), rows[:40]
    # and the two writers really overlapped in time
    order = [w for w, _, _ in rows]
    assert order.index("guest") < len(order) - 1 - order[::-1].index("host")
    assert order.index("host") < len(order) - 1 - order[::-1].index("guest")
