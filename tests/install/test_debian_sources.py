"""tests/support/debian.py reads the machine's apt configuration as apt does: the mirror for
another Debian suite comes from there, never from a host name written in the tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import assets, debian

ONE_LINE = """\
# deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
http://mirror.example/debian bookworm main contrib
deb-src http://mirror.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
"""

DEB822 = """\
Types: deb deb-src
# a comment inside the stanza
URIs: mirror+file:///etc/apt/mirrors/debian.list
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example/debian
Suites: forky
Components: main
Enabled: no
"""


def etc_with(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_one_line_format(tmp_path: Path) -> None:
    etc = etc_with(tmp_path, {"sources.list": ONE_LINE})
    mirror = debian.debian_mirror(etc, release="bookworm")
    assert mirror.uris == ("http://mirror.example/debian",)
    assert mirror.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert debian.source_for("bookworm-security", etc).uris == (
        "http://security.example/debian-security",)
    assert debian.source_for("trixie", etc) is None


def test_deb822_format(tmp_path: Path) -> None:
    etc = etc_with(tmp_path, {"sources.list.d/debian.sources": DEB822,
                              "sources.list.d/old.list.disabled": ONE_LINE})
    mirror = debian.debian_mirror(etc, release="trixie")
    assert mirror.uris == ("mirror+file:///etc/apt/mirrors/debian.list",)
    assert debian.source_for("forky", etc) is None  # Enabled: no
    assert debian.source_for("bookworm", etc) is None  # not a .list file
    text = debian.suite_sources_text("bookworm", mirror)
    assert text == ("Types: deb\nURIs: mirror+file:///etc/apt/mirrors/debian.list\n"
                    "Suites: bookworm\nComponents: main\n"
                    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    assert "Pin: release n=bookworm\nPin-Priority: 1\n" in debian.pin_text("bookworm")


def test_no_mirror_for_the_release(tmp_path: Path) -> None:
    etc = etc_with(tmp_path, {"sources.list": ONE_LINE})
    with pytest.raises(debian.AptError, match="trixie"):
        debian.debian_mirror(etc, release="trixie")


def test_host_release(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\n')
    assert debian.host_release(os_release) == "trixie"
    os_release.write_text('VERSION="12 (bookworm)"\n')
    assert debian.host_release(os_release) == "bookworm"


def test_kernel_suites() -> None:
    """Each guest kernel from where Debian ships it: the host's own suites when it is the
    release's kernel, else backports (6.12 on Debian 12) or the release it belongs to."""
    assert assets.kernel_suite("6.1", "bookworm") is None
    assert assets.kernel_suite("6.12", "bookworm") == "bookworm-backports"
    assert assets.kernel_suite("6.1", "trixie") == "bookworm"
    assert assets.kernel_suite("6.12", "trixie") is None
    assert assets.kernel_suite("6.12", "forky") == "trixie"


def test_no_mirror_host_names_in_the_support_code() -> None:
    support = Path(debian.__file__).parent
    for path in support.glob("*.py"):
        assert "deb.debian.org" not in path.read_text(), path
