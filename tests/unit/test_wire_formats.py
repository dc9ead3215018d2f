"""The Python struct layouts must match the kernel's: compile a C program against
<linux/fuse.h> and compare every size and the offsets that matter."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from daemon.protocol.vhost_user import ProtocolError

STRUCTS = {
    "fuse_in_header": fuse.IN_HEADER,
    "fuse_out_header": fuse.OUT_HEADER,
    "fuse_attr": fuse.ATTR,
    "fuse_init_out": fuse.INIT_OUT,
    "fuse_forget_in": fuse.FORGET_IN,
    "fuse_batch_forget_in": fuse.BATCH_FORGET_IN,
    "fuse_forget_one": fuse.FORGET_ONE,
    "fuse_getattr_in": fuse.GETATTR_IN,
    "fuse_setattr_in": fuse.SETATTR_IN,
    "fuse_mknod_in": fuse.MKNOD_IN,
    "fuse_mkdir_in": fuse.MKDIR_IN,
    "fuse_rename2_in": fuse.RENAME2_IN,
    "fuse_link_in": fuse.LINK_IN,
    "fuse_open_in": fuse.OPEN_IN,
    "fuse_create_in": fuse.CREATE_IN,
    "fuse_open_out": fuse.OPEN_OUT,
    "fuse_release_in": fuse.RELEASE_IN,
    "fuse_flush_in": fuse.FLUSH_IN,
    "fuse_read_in": fuse.READ_IN,
    "fuse_write_in": fuse.WRITE_IN,
    "fuse_write_out": fuse.WRITE_OUT,
    "fuse_statfs_out": fuse.STATFS_OUT,
    "fuse_fsync_in": fuse.FSYNC_IN,
    "fuse_access_in": fuse.ACCESS_IN,
    "fuse_fallocate_in": fuse.FALLOCATE_IN,
    "fuse_lseek_in": fuse.LSEEK_IN,
    "fuse_lseek_out": fuse.LSEEK_OUT,
    "fuse_copy_file_range_in": fuse.COPY_FILE_RANGE_IN,
    "fuse_setxattr_in": fuse.SETXATTR_IN,
    "fuse_getxattr_in": fuse.GETXATTR_IN,
    "fuse_getxattr_out": fuse.GETXATTR_OUT,
    "fuse_syncfs_in": fuse.SYNCFS_IN,
}


@pytest.fixture(scope="module")
def kernel_sizes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    src = tmp_path_factory.mktemp("sizes") / "sizes.c"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/fuse.h>",
             "int main(void) {"]
    for name in [*STRUCTS, "fuse_entry_out", "fuse_attr_out", "fuse_dirent",
                 "fuse_direntplus", "fuse_init_in"]:
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
    lines.append('printf("direntplus_name %zu\\n", offsetof(struct fuse_direntplus, '
                 'dirent.name));')
    lines.append("return 0; }")
    src.write_text("\n".join(lines))
    exe = Path(str(src)[:-2])
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes_match_linux_fuse_h(kernel_sizes: dict[str, int]) -> None:
    mismatches = {name: (s.size, kernel_sizes[name]) for name, s in STRUCTS.items()
                  if s.size != kernel_sizes[name]}
    assert mismatches == {}
    assert fuse.ENTRY_OUT_SIZE == kernel_sizes["fuse_entry_out"] == 128
    assert fuse.ATTR_OUT_HEAD.size + fuse.ATTR.size == kernel_sizes["fuse_attr_out"]
    assert fuse.DIRENT_HEAD.size == kernel_sizes["fuse_dirent"]
    assert fuse.ENTRY_OUT_SIZE + fuse.DIRENT_HEAD.size == kernel_sizes["direntplus_name"]
    assert fuse.INIT_IN.size <= kernel_sizes["fuse_init_in"]


def test_dirent_records_are_8_byte_aligned() -> None:
    assert fuse.dirent_size(1) == 32
    assert fuse.dirent_size(8) == 32
    assert fuse.dirent_size(9) == 40
    assert fuse.direntplus_size(1) == 160


def test_split_name_requires_nul() -> None:
    assert fuse.split_name(b"abc\0def\0") == (b"abc", 4)
    with pytest.raises(fuse.FuseError) as e:
        fuse.split_name(b"abc")
    assert e.value.errno == 22


def test_vhost_user_header_validation() -> None:
    assert vu.decode_header(vu.HEADER.pack(1, 1, 0)) == (1, 1, 0)
    with pytest.raises(ProtocolError, match="version"):
        vu.decode_header(vu.HEADER.pack(1, 2, 0))
    with pytest.raises(ProtocolError, match="too large"):
        vu.decode_header(vu.HEADER.pack(1, 1, 1 << 20))
    with pytest.raises(ProtocolError, match="short"):
        vu.decode_header(b"\1\0\0")


def test_vhost_user_payloads() -> None:
    table = vu.MEM_TABLE_HEAD.pack(2, 0) + vu.MEM_REGION.pack(0, 4096, 0x1000, 0) + (
        vu.MEM_REGION.pack(0x100000, 8192, 0x9000, 4096))
    regions = vu.decode_mem_table(table)
    assert [r.guest_phys_addr for r in regions] == [0, 0x100000]
    assert regions[1].mmap_offset == 4096
    with pytest.raises(ProtocolError):
        vu.decode_mem_table(vu.MEM_TABLE_HEAD.pack(9, 0))
    with pytest.raises(ProtocolError):
        vu.decode_mem_table(vu.MEM_TABLE_HEAD.pack(2, 0) + vu.MEM_REGION.pack(0, 1, 2, 3))
    assert vu.decode_vring_fd(vu.U64.pack(3)) == (3, True)
    assert vu.decode_vring_fd(vu.U64.pack(3 | 0x100)) == (3, False)


def test_virtio_fs_config_space() -> None:
    space = vu.virtio_fs_config("myfs", 2)
    assert len(space) == 40
    assert space[:5] == b"myfs\0"
    assert int.from_bytes(space[36:], "little") == 2
