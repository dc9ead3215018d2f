"""End-to-end: a real Linux guest mounts pyvirtiofsd's share and uses it as programs would.

One long guest script (:data:`GUEST_SCRIPT`) exercises the usual file operations, a 1,000-entry
directory, a 64 MiB file, non-root callers and parallel work; it prints its results in
``== section`` blocks that are deterministic apart from a few marked lines:

- ``INFO ...``   kernel version and CPU count,
- ``RAND ...``   hashes of random data (checked against the host's copy, then normalised),
- ``INTR ...``   the guest's ``/proc/interrupts`` lines for the virtio-fs request queues,
- ``STAT name mode size nlink uid gid mtime ino`` (mtime and inode differ between runs).

The same script runs on Linux 6.1 with one request queue, on Linux 6.12 with two vCPUs and two
request queues, and against QEMU's C virtiofsd for a differential comparison.  Each boot is
shared (module-scoped fixtures) by the tests that check it.  A second, smaller script checks
that the guest's view survives ``drop_caches`` (FORGETs, then fresh LOOKUPs) while the host
changes the share underneath it.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import reference, vm
from tests.support.daemon import daemon_log, pyvirtiofsd

GUEST_TIMEOUT = 300.0

# --------------------------------------------------------------------------------------------
# What the host puts in the share before the guest boots, and the main guest script.

SEED_FILES: dict[str, tuple[bytes, int]] = {
    "hello.txt": (b"hello from the host\n", 0o644),
    "ro.txt": (b"read only\n", 0o444),
    "subdir/nested.txt": (b"nested file\n", 0o644),
}

ALL_BYTES = bytes(range(256)) * 4  # every byte value, including NUL and newline
LONG_NAME = "n" * 255  # NAME_MAX: allowed
TOO_LONG_NAME = "m" * 256  # NAME_MAX + 1: ENAMETOOLONG from the host
LONG_TARGET = "/".join(["t" * 50] * 40)  # a 2,039-byte symlink target
FIXED_MTIME = calendar.timegm((2001, 2, 3, 4, 5, 6))  # touch -t 200102030405.06 (guest is UTC)
MANY = 1000
PAR_FILES = 120  # files per parallel worker
BIG_MIB = 64
SLICE_SKIP, SLICE_COUNT = 9999, 3  # a 4 KiB-block slice of the big file read back with dd

# Paths whose stat the guest prints at the end and the host compares with os.lstat.
STAT_PATHS = (
    ".", "hello.txt", "ro.txt", "subdir", "subdir/nested.txt", "notes.txt", "sparse.bin",
    "bytes.bin", "victim.txt", "dirA", "dirA/dir2", "dirA/dir2/moved.txt", "orig.txt",
    "hard.txt", "sym.txt", "dangling", "longlink", "private", "chowned.txt", "fixed.txt",
    "fifo", "falloc.bin", "userdir", "userdir/mine.txt", "userdir/minedir", "userdir/minelink",
    "sticky", "sticky/rootfile.txt", "sticky/by1234.txt", "many", "many/f0", "many/f999",
    "big.bin", LONG_NAME,
)  # fmt: skip


def _printf_escape(data: bytes) -> str:
    """A printf format string (octal escapes) that prints exactly ``data``."""
    return "".join(f"\\{b:03o}" for b in data)


WORKER_SCRIPT = r"""
w=$1; d=/mnt/par/w$w
mkdir $d || echo "FAIL mkdir $d"
i=0
while [ $i -lt @PAR@ ]; do
  echo "worker $w file $i" > $d/f$i || echo "FAIL create $d/f$i"
  i=$((i+1))
done
bad=0; i=0
while [ $i -lt @PAR@ ]; do
  read -r line < $d/f$i
  [ "$line" = "worker $w file $i" ] || bad=$((bad+1))
  i=$((i+1))
done
echo "w$w readback-mismatches=$bad"
echo "w$w files=$(ls $d | wc -l)"
echo "w$w sizes:" $(stat -c %s $d/* | sort -n | uniq -c)
i=0
while [ $i -lt @PAR@ ]; do
  case $((i % 3)) in
    0) rm $d/f$i || echo "FAIL rm $d/f$i";;
    1) mv $d/f$i $d/r$i || echo "FAIL mv $d/f$i";;
  esac
  i=$((i+1))
done
echo "w$w after-rm-mv=$(ls $d | wc -l)"
dd if=/dev/zero of=$d/zeros bs=65536 count=64 2>/dev/null || echo "FAIL dd $d/zeros"
echo "w$w zeros" $(md5sum < $d/zeros)
echo "w$w done"
""".replace("@PAR@", str(PAR_FILES))

GUEST_SCRIPT = (
    r"""
umask 022
echo "INFO kernel=$(uname -r) cpus=$(nproc)"
mount -t virtiofs myfs /mnt || { echo "FAIL mount"; exit 1; }
cd /mnt || exit 1
NCPU=$(nproc)
fail() { echo "FAIL $*"; }
try() { "$@" 2>&1; echo "rc=$?"; }

echo "== seed"
cat hello.txt subdir/nested.txt
ls -1

echo "== write"
printf 'line one\n' > notes.txt
printf 'line two\n' >> notes.txt
cat notes.txt
stat -c 'size=%s' notes.txt
printf 'XY' | dd of=notes.txt bs=1 seek=5 conv=notrunc 2>/dev/null
cat notes.txt
truncate -s 4 notes.txt
cat notes.txt; echo
stat -c 'size=%s' notes.txt
truncate -s 4100 notes.txt
stat -c 'size=%s' notes.txt
xxd -p -l 8 notes.txt
md5sum notes.txt
printf 'end' | dd of=sparse.bin bs=1 seek=1048576 2>/dev/null
stat -c 'size=%s' sparse.bin
md5sum sparse.bin
printf '@ALLBYTES@' > bytes.bin
stat -c 'size=%s' bytes.bin
md5sum bytes.bin

echo "== rename"
echo data > old.txt
mv old.txt new.txt
[ -e old.txt ] && fail old.txt still exists
cat new.txt
echo victim > victim.txt
echo winner > winner.txt
mv winner.txt victim.txt
cat victim.txt
try ls winner.txt
mkdir -p dir1/dir2
mv new.txt dir1/dir2/moved.txt
mv dir1 dirA
cat dirA/dir2/moved.txt
find dirA | sort

echo "== link"
echo linked > orig.txt
ln orig.txt hard.txt
stat -c '%n nlink=%h' orig.txt hard.txt
[ "$(stat -c %i orig.txt)" = "$(stat -c %i hard.txt)" ] && echo same-inode
echo appended >> hard.txt
cat orig.txt
ln orig.txt hard2.txt
stat -c '%n nlink=%h' orig.txt
rm hard2.txt
stat -c '%n nlink=%h' orig.txt hard.txt

echo "== symlink"
ln -s orig.txt sym.txt
readlink sym.txt
cat sym.txt
stat -c '%n %F %s' sym.txt
stat -L -c '%n %F %s' sym.txt
ln -s no/such/target dangling
readlink dangling
try cat dangling
ln -s dirA/dir2 dirlink
ls dirlink
ln -s @LONGTARGET@ longlink
[ "$(readlink longlink)" = "@LONGTARGET@" ] && echo long-target-ok
stat -c '%n %s' longlink
rm dirlink

echo "== unlink"
echo gone > gone.txt
rm gone.txt
try ls gone.txt
echo still-readable > open.txt
exec 3< open.txt
rm open.txt
cat <&3
exec 3<&-
try stat -c %s open.txt

echo "== dirs"
mkdir -p a/b/c
find a | sort
rmdir a/b/c
rmdir a/b
ls -1a a
rmdir a
try ls a
mkdir -m 700 private
stat -c '%n %A %h' private
mkdir private/x private/y
stat -c '%n %h' private

echo "== attrs"
chmod 640 orig.txt
stat -c '%n %a' orig.txt hard.txt
echo owned > chowned.txt
chown 4321:4322 chowned.txt
stat -c '%n %u:%g %a' chowned.txt
echo fixed > fixed.txt
touch -t 200102030405.06 fixed.txt
stat -c '%n %Y' fixed.txt
mkfifo fifo
stat -c '%n %F %a' fifo
fallocate -l 65536 falloc.bin
stat -c '%n %s' falloc.bin
md5sum falloc.bin

echo "== users"
mkdir -p /etc
echo 'root:x:0:0::/root:/bin/sh' > /etc/passwd
echo 'user:x:1234:1234::/tmp:/bin/sh' >> /etc/passwd
echo 'other:x:1234:1235::/tmp:/bin/sh' >> /etc/passwd
printf 'root:x:0:\nuser:x:1234:\nother:x:1235:\n' > /etc/group
mkdir userdir
chown 1234:1234 userdir
su -s /bin/sh -c '
  echo "uid=$(id -u) gid=$(id -g)"
  echo mine > /mnt/userdir/mine.txt; echo "rc=$?"
  mkdir /mnt/userdir/minedir; echo "rc=$?"
  ln -s mine.txt /mnt/userdir/minelink; echo "rc=$?"
' user 2>&1
stat -c '%n %u:%g %a' userdir userdir/mine.txt userdir/minedir userdir/minelink
mkdir sticky
chmod 1777 sticky
echo rootfile > sticky/rootfile.txt
su -s /bin/sh -c '
  echo "uid=$(id -u) gid=$(id -g)"
  echo x > /mnt/sticky/by1234.txt; echo "rc=$?"
  echo no > /mnt/denied.txt; echo "rc=$?"
  echo no >> /mnt/ro.txt; echo "rc=$?"
  rm -f /mnt/hello.txt; echo "rc=$?"
  rm -f /mnt/sticky/rootfile.txt; echo "rc=$?"
  cat /mnt/private/x; echo "rc=$?"
' other 2>&1
stat -c '%n %u:%g %a' sticky sticky/by1234.txt sticky/rootfile.txt
try ls denied.txt

echo "== errors"
try cat nope.txt
try mkdir subdir
try rmdir dirA
try unlink dirA
try rmdir hello.txt
try ls hello.txt/x
try touch @TOOLONG@
echo long > @LONG@
cat @LONG@
ln -s loop1 loop2
ln -s loop2 loop1
try cat loop1
rm loop1 loop2
sh -C -c 'echo clobber > hello.txt' 2>&1; echo "rc=$?"
try ln dirA dirA-hard
try mv subdir subdir/inside
cat hello.txt

echo "== many"
mkdir many
i=0
while [ $i -lt @MANY@ ]; do
  echo "entry $i" > many/f$i || fail create many/f$i
  i=$((i+1))
done
ls -1 many | wc -l
find many -type f | wc -l
ls -1a many
ls -ln many | awk 'NF >= 9 {print $1, $2, $5, $9}' | md5sum
cat many/f0 many/f999

echo "== big"
dd if=/dev/urandom of=big.bin bs=1M count=@BIGMIB@ 2>/dev/null; echo "dd rc=$?"
stat -c 'size=%s' big.bin
set -- $(sha256sum big.bin); H1=$1
sync
echo 3 > /proc/sys/vm/drop_caches
set -- $(sha256sum big.bin); H2=$1
[ "$H1" = "$H2" ] && echo "sha256 same before and after drop_caches"
echo "RAND big-sha256 $H2"
set -- $(dd if=big.bin bs=4096 skip=@SKIP@ count=@COUNT@ 2>/dev/null | sha256sum)
echo "RAND big-slice-sha256 $1"

echo "== parallel"
cat > /tmp/pw.sh <<'WORKER_EOF'
@WORKER@
WORKER_EOF
mkdir par
for w in 0 1; do
  taskset -c $((w % NCPU)) sh /tmp/pw.sh $w > /tmp/pw$w.out 2>&1 &
done
wait
cat /tmp/pw0.out /tmp/pw1.out

echo "== stat"
for p in @STATPATHS@; do
  stat -c 'STAT %n %f %s %h %u %g %Y %i' "$p" || fail stat $p
done
grep -E 'virtio[0-9]+-requests' /proc/interrupts | sed 's/^/INTR /'

echo "== end"
cd /
umount /mnt; echo "umount rc=$?"
echo "mounted=$(grep -c ' /mnt ' /proc/mounts)"
""".replace("@ALLBYTES@", _printf_escape(ALL_BYTES))
    .replace("@LONGTARGET@", LONG_TARGET)
    .replace("@TOOLONG@", TOO_LONG_NAME)
    .replace("@LONG@", LONG_NAME)
    .replace("@MANY@", str(MANY))
    .replace("@BIGMIB@", str(BIG_MIB))
    .replace("@SKIP@", str(SLICE_SKIP))
    .replace("@COUNT@", str(SLICE_COUNT))
    .replace("@WORKER@", WORKER_SCRIPT.strip())
    .replace("@STATPATHS@", " ".join(STAT_PATHS))
)


# --------------------------------------------------------------------------------------------
# Helpers


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def seed_share(share: Path) -> None:
    """The share as the host prepares it (identical for every daemon)."""
    share.mkdir()
    share.chmod(0o755)  # tmp_path parents are 0700; the guest's uid 1234 must traverse the root
    for rel, (data, mode) in SEED_FILES.items():
        path = share / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)


def sections(output: str) -> dict[str, str]:
    """Split the script output into its ``== name`` sections (the text before is ``head``)."""
    result: dict[str, str] = {}
    name = "head"
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith("== "):
            result[name] = "\n".join(lines) + "\n" if lines else ""
            name, lines = line[3:], []
        else:
            lines.append(line)
    result[name] = "\n".join(lines) + "\n" if lines else ""
    return result


@dataclass
class StatLine:
    name: str
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime: int
    ino: int


def stat_lines(output: str) -> dict[str, StatLine]:
    result: dict[str, StatLine] = {}
    for line in output.splitlines():
        if line.startswith("STAT "):
            _, name, mode, size, nlink, uid, gid, mtime, ino = line.split()
            result[name] = StatLine(
                name, int(mode, 16), int(size), int(nlink), int(uid), int(gid), int(mtime),
                int(ino),
            )  # fmt: skip
    return result


def rand_lines(output: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2) for m in re.finditer(r"^RAND (\S+) (\S+)$", output, re.MULTILINE)
    }


def normalise(output: str) -> str:
    """What must be identical between daemons and between kernels/queue counts."""
    out: list[str] = []
    for line in output.splitlines():
        if line.startswith(("INFO ", "INTR ")):
            continue
        if line.startswith("RAND "):
            line = " ".join([*line.split()[:2], "<random>"])
        elif line.startswith("STAT "):
            line = " ".join([*line.split()[:7], "<mtime>", "<ino>"])
        out.append(line)
    return "\n".join(out)


def host_tree(share: Path) -> dict[str, tuple[object, ...]]:
    """Names, types, permission bits, owners, link counts, sizes and contents on the host."""
    tree: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(share):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(share))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                content: object = sha256_file(path)
            elif stat.S_ISLNK(kind):
                content = os.readlink(path)
            else:
                content = None
            size = st.st_size if not stat.S_ISDIR(kind) else None  # dir sizes are the fs's
            nlink = st.st_nlink
            tree[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, nlink, size, content)
    return tree


def expected_files() -> dict[str, bytes]:
    """Every regular file the script leaves behind (except big.bin), with its contents."""
    files = {
        "hello.txt": b"hello from the host\n",
        "ro.txt": b"read only\n",
        "subdir/nested.txt": b"nested file\n",
        "notes.txt": b"line" + bytes(4096),
        "sparse.bin": bytes(1048576) + b"end",
        "bytes.bin": ALL_BYTES,
        "victim.txt": b"winner\n",
        "dirA/dir2/moved.txt": b"data\n",
        "orig.txt": b"linked\nappended\n",
        "hard.txt": b"linked\nappended\n",
        "chowned.txt": b"owned\n",
        "fixed.txt": b"fixed\n",
        "falloc.bin": bytes(65536),
        "userdir/mine.txt": b"mine\n",
        "sticky/rootfile.txt": b"rootfile\n",
        "sticky/by1234.txt": b"x\n",
        LONG_NAME: b"long\n",
    }
    for i in range(MANY):
        files[f"many/f{i}"] = f"entry {i}\n".encode()
    for w in (0, 1):
        for i in range(PAR_FILES):
            if i % 3 == 1:
                files[f"par/w{w}/r{i}"] = f"worker {w} file {i}\n".encode()
            elif i % 3 == 2:
                files[f"par/w{w}/f{i}"] = f"worker {w} file {i}\n".encode()
        files[f"par/w{w}/zeros"] = bytes(65536 * 64)
    return files


EXPECTED_DIRS = {
    "subdir", "dirA", "dirA/dir2", "private", "private/x", "private/y", "userdir",
    "userdir/minedir", "sticky", "many", "par", "par/w0", "par/w1",
}  # fmt: skip
EXPECTED_SYMLINKS = {
    "sym.txt": "orig.txt",
    "dangling": "no/such/target",
    "longlink": LONG_TARGET,
    "userdir/minelink": "mine.txt",
}


def expected_sections() -> dict[str, str]:
    """The exact text of each deterministic section of the script's output."""
    many_names = sorted(f"f{i}" for i in range(MANY))
    ls_ln = "".join(f"-rw-r--r-- 1 {len(f'entry {n[1:]}') + 1} {n}\n" for n in many_names)
    par = []
    for w in (0, 1):
        sizes: dict[int, int] = {}
        for i in range(PAR_FILES):
            n = len(f"worker {w} file {i}\n")
            sizes[n] = sizes.get(n, 0) + 1
        size_words = " ".join(f"{count} {size}" for size, count in sorted(sizes.items()))
        par.append(
            f"w{w} readback-mismatches=0\n"
            f"w{w} files={PAR_FILES}\n"
            f"w{w} sizes: {size_words}\n"
            f"w{w} after-rm-mv={PAR_FILES - (PAR_FILES + 2) // 3}\n"
            f"w{w} zeros {md5(bytes(65536 * 64))} -\n"
            f"w{w} done\n"
        )
    return {
        "seed": "hello from the host\nnested file\nhello.txt\nro.txt\nsubdir\n",
        "write": (
            "line one\nline two\nsize=18\nline XYe\nline two\nline\nsize=4\nsize=4100\n"
            "6c696e6500000000\n"
            f"{md5(b'line' + bytes(4096))}  notes.txt\n"
            "size=1048579\n"
            f"{md5(bytes(1048576) + b'end')}  sparse.bin\n"
            f"size={len(ALL_BYTES)}\n"
            f"{md5(ALL_BYTES)}  bytes.bin\n"
        ),
        "rename": (
            "data\nwinner\n"
            "ls: winner.txt: No such file or directory\nrc=1\n"
            "data\ndirA\ndirA/dir2\ndirA/dir2/moved.txt\n"
        ),
        "link": (
            "orig.txt nlink=2\nhard.txt nlink=2\nsame-inode\nlinked\nappended\n"
            "orig.txt nlink=3\norig.txt nlink=2\nhard.txt nlink=2\n"
        ),
        "symlink": (
            "orig.txt\nlinked\nappended\nsym.txt symbolic link 8\nsym.txt regular file 16\n"
            "no/such/target\n"
            "cat: can't open 'dangling': No such file or directory\nrc=1\n"
            "moved.txt\nlong-target-ok\n"
            f"longlink {len(LONG_TARGET)}\n"
        ),
        "unlink": (
            "ls: gone.txt: No such file or directory\nrc=1\n"
            "still-readable\n"
            "stat: can't stat 'open.txt': No such file or directory\nrc=1\n"
        ),
        "dirs": (
            "a\na/b\na/b/c\n.\n..\n"
            "ls: a: No such file or directory\nrc=1\n"
            "private drwx------ 2\nprivate 4\n"
        ),
        "attrs": (
            "orig.txt 640\nhard.txt 640\nchowned.txt 4321:4322 644\n"
            f"fixed.txt {FIXED_MTIME}\n"
            "fifo fifo 644\nfalloc.bin 65536\n"
            f"{md5(bytes(65536))}  falloc.bin\n"
        ),
        "users": (
            "uid=1234 gid=1234\nrc=0\nrc=0\nrc=0\n"
            "userdir 1234:1234 755\nuserdir/mine.txt 1234:1234 644\n"
            "userdir/minedir 1234:1234 755\nuserdir/minelink 1234:1234 777\n"
            "uid=1234 gid=1235\nrc=0\n"
            "sh: can't create /mnt/denied.txt: Permission denied\nrc=1\n"
            "sh: can't create /mnt/ro.txt: Permission denied\nrc=1\n"
            "rm: can't remove '/mnt/hello.txt': Permission denied\nrc=1\n"
            "rm: can't remove '/mnt/sticky/rootfile.txt': Operation not permitted\nrc=1\n"
            "cat: can't open '/mnt/private/x': Permission denied\nrc=1\n"
            "sticky 0:0 1777\nsticky/by1234.txt 1234:1235 644\nsticky/rootfile.txt 0:0 644\n"
            "ls: denied.txt: No such file or directory\nrc=1\n"
        ),
        "errors": (
            "cat: can't open 'nope.txt': No such file or directory\nrc=1\n"
            "mkdir: can't create directory 'subdir': File exists\nrc=1\n"
            "rmdir: 'dirA': Directory not empty\nrc=1\n"
            "unlink: can't remove file 'dirA': Is a directory\nrc=1\n"
            "rmdir: 'hello.txt': Not a directory\nrc=1\n"
            "ls: hello.txt/x: Not a directory\nrc=1\n"
            f"touch: {TOO_LONG_NAME}: File name too long\nrc=1\n"
            "long\n"
            "cat: can't open 'loop1': Too many levels of symbolic links\nrc=1\n"
            "sh: can't create hello.txt: File exists\nrc=1\n"
            "ln: dirA-hard: Operation not permitted\nrc=1\n"
            "mv: can't rename 'subdir': Invalid argument\nrc=1\n"
            "hello from the host\n"
        ),
        "many": (
            f"{MANY}\n{MANY}\n.\n..\n"
            + "".join(f"{n}\n" for n in many_names)
            + f"{md5(ls_ln.encode())}  -\n"
            + f"entry 0\nentry {MANY - 1}\n"
        ),
        "big": (
            "dd rc=0\n"
            f"size={BIG_MIB << 20}\n"
            "sha256 same before and after drop_caches\n"
            "RAND big-sha256 <random>\nRAND big-slice-sha256 <random>\n"
        ),
        "parallel": "".join(par),
        "end": "umount rc=0\nmounted=0\n",
    }


@dataclass
class Boot:
    """One guest run of :data:`GUEST_SCRIPT` and the share it left behind."""

    run: vm.GuestRun
    share: Path
    log: str


def boot(root: Path, daemon: str, kernel: str = "6.1", smp: int = 1, queues: int = 1) -> Boot:
    share = root / "share"
    seed_share(share)
    with tempfile.TemporaryDirectory(prefix="pyvfs-e2e-", dir="/tmp") as sock_dir:
        socket = Path(sock_dir) / "vfs.sock"
        if daemon == "c":
            with reference.c_virtiofsd(share, socket) as proc:
                run = vm.run_guest(
                    socket, GUEST_SCRIPT, kernel=kernel, smp=smp, num_request_queues=queues,
                    timeout=GUEST_TIMEOUT,
                )  # fmt: skip
            log = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        else:
            with pyvirtiofsd(share, socket) as proc:
                run = vm.run_guest(
                    socket, GUEST_SCRIPT, kernel=kernel, smp=smp, num_request_queues=queues,
                    timeout=GUEST_TIMEOUT,
                )  # fmt: skip
            log = daemon_log(proc)
    print(
        f"{daemon} kernel {kernel} smp={smp} queues={queues}: boot {run.boot_seconds}s, "
        f"script {run.script_seconds}s, total {run.total_seconds:.1f}s"
    )
    return Boot(run, share, log)


def describe(b: Boot) -> str:
    return f"{b.run.describe()}\n--- script output ---\n{b.run.script_output}\n--- log ---\n{b.log}"


def check_boot(b: Boot) -> None:
    """Everything a user of the mount and of the host directory can see, for one boot."""
    run, share = b.run, b.share
    assert run.rc == 0, describe(b)
    out = run.script_output
    assert "FAIL" not in out, describe(b)
    got = sections(out)
    for name, text in expected_sections().items():
        if name in ("many", "big"):
            continue  # compared below, with a shorter diff
        assert got.get(name) == text, f"section {name!r}\n{describe(b)}"
    many = got["many"].splitlines()
    want_many = expected_sections()["many"].splitlines()
    assert len(many) == len(want_many), got["many"][:2000]
    assert set(many) == set(want_many), sorted(set(many) ^ set(want_many))[:20]
    assert many == want_many
    assert normalise(got["big"]) == expected_sections()["big"].rstrip("\n"), got["big"]

    # the 64 MiB file: the guest's reads (after drop_caches) match the host's bytes
    rand = rand_lines(out)
    big = share / "big.bin"
    assert big.stat().st_size == BIG_MIB << 20
    assert rand["big-sha256"] == sha256_file(big)
    with open(big, "rb") as fh:
        fh.seek(SLICE_SKIP * 4096)
        assert rand["big-slice-sha256"] == hashlib.sha256(fh.read(SLICE_COUNT * 4096)).hexdigest()

    # stat fields: the guest's stat equals the host's lstat
    stats = stat_lines(out)
    assert set(stats) == set(STAT_PATHS), sorted(set(STAT_PATHS) ^ set(stats))
    for name, g in stats.items():
        h = os.lstat(share / name)
        host = StatLine(
            name, h.st_mode, h.st_size, h.st_nlink, h.st_uid, h.st_gid, int(h.st_mtime), h.st_ino
        )
        assert g == host, f"guest {g} != host {host}"
    assert stats["fixed.txt"].mtime == FIXED_MTIME

    # the host sees exactly what the guest wrote
    tree = host_tree(share)
    files = expected_files()
    want_names = set(files) | EXPECTED_DIRS | set(EXPECTED_SYMLINKS) | {"big.bin", "fifo"}
    assert set(tree) == want_names, (
        f"host has extra {sorted(set(tree) - want_names)[:20]}, "
        f"misses {sorted(want_names - set(tree))[:20]}"
    )
    for rel, data in files.items():
        kind, _mode, _uid, _gid, _nlink, size, digest = tree[rel]
        assert kind == stat.S_IFREG, rel
        assert size == len(data), rel
        assert digest == hashlib.sha256(data).hexdigest(), rel
    for rel, target in EXPECTED_SYMLINKS.items():
        assert tree[rel][0] == stat.S_IFLNK and tree[rel][6] == target, rel
    for rel in EXPECTED_DIRS:
        assert tree[rel][0] == stat.S_IFDIR, rel
    assert tree["fifo"][0] == stat.S_IFIFO
    # link counts, permissions and owners, as the host sees them
    nlinks = {rel: entry[4] for rel, entry in tree.items()}
    assert nlinks["orig.txt"] == nlinks["hard.txt"] == 2
    assert os.stat(share / "orig.txt").st_ino == os.stat(share / "hard.txt").st_ino
    assert all(nlinks[rel] == 1 for rel in files if rel not in ("orig.txt", "hard.txt"))
    assert nlinks["private"] == 4 and nlinks["dirA"] == 3
    owners = {rel: (entry[1], entry[2], entry[3]) for rel, entry in tree.items()}
    assert owners["userdir"] == (0o755, 1234, 1234)  # chown by root in the guest
    assert owners["userdir/mine.txt"] == (0o644, 1234, 1234)  # created by uid 1234
    assert owners["userdir/minedir"] == (0o755, 1234, 1234)
    assert owners["userdir/minelink"][1:] == (1234, 1234)
    assert owners["sticky/by1234.txt"] == (0o644, 1234, 1235)
    assert owners["sticky"] == (0o1777, 0, 0)
    assert owners["chowned.txt"] == (0o644, 4321, 4322)
    assert owners["orig.txt"] == owners["hard.txt"] == (0o640, 0, 0)
    assert owners["private"] == (0o700, 0, 0)
    assert owners["ro.txt"] == (0o444, 0, 0)
    assert owners["fifo"] == (0o644, 0, 0)
    assert all(owners[rel] == (0o644, 0, 0) for rel in files if rel.startswith(("many/", "par/")))
    assert os.stat(share / "fixed.txt").st_mtime == FIXED_MTIME


# --------------------------------------------------------------------------------------------
# Boots, shared by the tests of this module


@pytest.fixture(scope="module")
def py61(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return boot(tmp_path_factory.mktemp("py61"), "py", kernel="6.1")


@pytest.fixture(scope="module")
def c61(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return boot(tmp_path_factory.mktemp("c61"), "c", kernel="6.1")


@pytest.fixture(scope="module")
def py612(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return boot(tmp_path_factory.mktemp("py612"), "py", kernel="6.12", smp=2, queues=2)


@pytest.mark.guest
def test_linux61_one_queue_filesystem(py61: Boot) -> None:
    """Linux 6.1, one request queue: every operation, the 1,000-entry directory, 64 MiB,
    stat fields, guest callers' ownership, and the host's view after umount."""
    assert py61.run.script_output.startswith("INFO kernel=6.1."), describe(py61)
    check_boot(py61)


@pytest.mark.guest
def test_linux612_two_queues_filesystem(py612: Boot, py61: Boot) -> None:
    """Linux 6.12 on two vCPUs with two request queues: the same script, work pinned to both
    CPUs; the same results as with one queue, and both queues really carried requests."""
    out = py612.run.script_output
    assert out.startswith("INFO kernel=6.12.") and " cpus=2\n" in out, describe(py612)
    check_boot(py612)
    for queue in (1, 2):
        assert re.search(rf"queue {queue}: worker \d+ started", py612.log), py612.log
    interrupts = [line.split() for line in out.splitlines() if line.startswith("INTR ")]
    if interrupts:
        # INTR <irq>: <count on cpu0> <count on cpu1> <chip> ... <name>
        per_queue = {
            fields[-1]: sum(int(f) for f in fields[2:] if f.isdigit()) for fields in interrupts
        }
        assert len(per_queue) == 2, interrupts
        assert all(count > 0 for count in per_queue.values()), per_queue
    assert normalise(out) == normalise(py61.run.script_output)


@pytest.mark.guest
def test_differential_against_c_virtiofsd(py61: Boot, c61: Boot) -> None:
    """The same script against C virtiofsd and pyvirtiofsd: the guest sees the same thing
    (bar inode numbers, times and random data), and the hosts' trees are the same."""
    check_boot(c61)  # the expectations hold for the reference daemon too
    assert py61.run.rc == 0, describe(py61)
    c_out = normalise(c61.run.script_output).splitlines()
    py_out = normalise(py61.run.script_output).splitlines()
    diff = [(i, c, p) for i, (c, p) in enumerate(zip(c_out, py_out, strict=False)) if c != p]
    assert not diff and len(c_out) == len(py_out), (
        f"first differences (line, C virtiofsd, pyvirtiofsd): {diff[:10]}; "
        f"lines {len(c_out)} vs {len(py_out)}"
    )
    c_tree, py_tree = host_tree(c61.share), host_tree(py61.share)
    for tree in (c_tree, py_tree):
        tree["big.bin"] = tree["big.bin"][:6]  # random contents: size only
    only = set(c_tree) ^ set(py_tree)
    assert not only, sorted(only)[:20]
    differing = {rel: (c_tree[rel], py_tree[rel]) for rel in c_tree if c_tree[rel] != py_tree[rel]}
    assert not differing, list(differing.items())[:10]


# --------------------------------------------------------------------------------------------
# drop_caches: FORGETs, then fresh LOOKUPs of 1,000 files while the host changes the share

DROP_FILES = 1000
DROP_SCRIPT = r"""
mount -t virtiofs myfs /mnt || { echo "FAIL mount"; exit 1; }
cd /mnt/d || exit 1
echo "== before"
stat -c '%n %s %a %h %i' *
exec 3< f0005
exec 4< f0009
sync
echo 3 > /proc/sys/vm/drop_caches
echo 3 > /proc/sys/vm/drop_caches
: > /mnt/phase1
n=0
while [ ! -e /mnt/phase2 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
[ -e /mnt/phase2 ] || echo "FAIL host never answered"
echo 3 > /proc/sys/vm/drop_caches
echo "== after"
stat -c '%n %s %a %h %i' *
echo "== contents"
for f in *; do read -r line < $f; echo "$f $line"; done
echo "== held"
cat <&3
cat <&4
exec 3<&- 4<&-
echo "== again"
echo 3 > /proc/sys/vm/drop_caches
ls -1 | wc -l
stat -c '%n %s %a %h %i' * | md5sum
cd /
umount /mnt; echo "umount rc=$?"
"""


def _drop_content(i: int) -> str:
    return f"file {i:04d}:" + "x" * (i % 97)


def _mutate_when_asked(share: Path, done: threading.Event, errors: list[str]) -> None:
    """Host side of the handshake: once the guest has dropped its caches, change the share."""
    d = share / "d"
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not (share / "phase1").exists():
        if done.is_set() or time.monotonic() > deadline:
            errors.append("guest never wrote phase1")
            return
        time.sleep(0.05)
    (d / "f0007").unlink()
    (d / "f0007").write_text("replaced by the host\n")  # a new inode under an old name
    (d / "f0009").unlink()  # the guest holds it open
    (d / "f0008").rename(d / "g0008")
    (d / "f0010").write_text("rewritten in place\n")  # same inode, new contents
    (d / "f0011").chmod(0o600)
    os.link(d / "f0012", d / "h0012")
    (d / "h1000").write_text("new from the host\n")
    (share / "phase2").touch()


@pytest.mark.guest
def test_view_survives_drop_caches_with_1000_files(tmp_path: Path) -> None:
    """1,000 files stat'ed, forgotten (drop_caches) and stat'ed again while the host renames,
    replaces, deletes and creates some of them: the guest sees the host's current state,
    and files it holds open stay readable."""
    share = tmp_path / "share"
    (share / "d").mkdir(parents=True)
    for i in range(DROP_FILES):
        (share / "d" / f"f{i:04d}").write_text(_drop_content(i) + "\n")
    before = {
        p.name: os.lstat(p) for p in (share / "d").iterdir()
    }  # the host's view before the guest runs
    done = threading.Event()
    errors: list[str] = []
    mutator = threading.Thread(target=_mutate_when_asked, args=(share, done, errors))
    with tempfile.TemporaryDirectory(prefix="pyvfs-e2e-", dir="/tmp") as sock_dir:
        socket = Path(sock_dir) / "vfs.sock"
        with pyvirtiofsd(share, socket) as proc:
            mutator.start()
            try:
                run = vm.run_guest(socket, DROP_SCRIPT, kernel="6.1", timeout=GUEST_TIMEOUT)
            finally:
                done.set()
                mutator.join()
            log = daemon_log(proc)
    info = f"{run.describe()}\n--- script output ---\n{run.script_output}\n--- log ---\n{log}"
    assert run.rc == 0, info
    assert not errors, info
    assert "FAIL" not in run.script_output, info
    got = sections(run.script_output)

    def stat_text(stats: dict[str, os.stat_result]) -> str:
        return "".join(
            f"{name} {st.st_size} {stat.S_IMODE(st.st_mode):o} {st.st_nlink} {st.st_ino}\n"
            for name, st in sorted(stats.items())
        )

    assert got["before"] == stat_text(before), info
    after = {p.name: os.lstat(p) for p in (share / "d").iterdir()}
    assert len(after) == DROP_FILES + 1
    assert got["after"] == stat_text(after), info
    # what the host changed is what the guest sees
    after_lines = dict(line.split(" ", 1) for line in got["after"].splitlines())
    assert "f0009" not in after_lines and "f0008" not in after_lines
    assert after_lines["f0011"].split()[1] == "600"
    assert after_lines["f0012"].split()[2] == "2" and after_lines["h0012"].split()[2] == "2"
    want_contents = {name: (share / "d" / name).read_text().rstrip("\n") for name in after}
    assert want_contents["f0007"] == "replaced by the host"
    assert got["contents"] == "".join(f"{n} {c}\n" for n, c in sorted(want_contents.items()))
    # an fd the guest held across drop_caches, and one whose file the host deleted
    assert got["held"] == f"{_drop_content(5)}\n{_drop_content(9)}\n", info
    assert got["again"].splitlines()[0] == str(DROP_FILES + 1)
    assert got["again"].splitlines()[1] == f"{hashlib.md5(got['after'].encode()).hexdigest()}  -"
    assert got["again"].splitlines()[2] == "umount rc=0"
