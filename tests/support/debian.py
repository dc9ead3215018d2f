"""The Debian host the tests run on: its release, its apt sources, and other Debian suites.

The tests take guest kernels and reference daemons from Debian packages (unpacked, never
installed), some from another suite than the host's own: the 6.12 kernel from
bookworm-backports and Rust virtiofsd from trixie on Debian 12, the 6.1 kernel from
bookworm on Debian 13. Such a suite is added from the mirror the machine's own apt
configuration uses for the Debian archive (read from ``/etc/apt/sources.list`` and
``sources.list.d/*.list`` / ``*.sources``, as apt reads them), pinned to priority 1 so that
nothing on the host is ever upgraded from it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ETC_APT = Path("/etc/apt")
OS_RELEASE = Path("/etc/os-release")
#: suites this module adds are named pyvirtiofsd-<suite>.sources in sources.list.d
ADDED_PREFIX = "pyvirtiofsd-"


class AptError(RuntimeError):
    """An apt operation failed or apt's configuration does not say what we need."""


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` entry of the apt configuration (a line, or a deb822 stanza)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None
    file: Path


def host_release(os_release: Path = OS_RELEASE) -> str:
    """The host's Debian codename (``bookworm``, ``trixie``, ...) from os-release."""
    fields: dict[str, str] = {}
    try:
        text = os_release.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    if fields.get("VERSION_CODENAME"):
        return fields["VERSION_CODENAME"]
    match = re.search(r"\((\w+)\)", fields.get("VERSION", ""))
    return match.group(1) if match else ""


def parse_one_line(text: str, file: Path) -> list[AptSource]:
    """``deb [options] URI SUITE COMPONENT...`` lines (sources.list format)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: dict[str, str] = {}
        match = re.match(r"(\S+)\s+\[([^\]]*)\]\s*(.*)", line)
        if match:
            kind, opts, rest = match.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[key.lower()] = value
        else:
            kind, _, rest = line.partition(" ")
        if kind != "deb" or options.get("enabled", "yes").lower() == "no":
            continue
        words = rest.split()
        if len(words) < 2:
            continue
        out.append(AptSource((words[0],), (words[1],), tuple(words[2:]),
                             options.get("signed-by"), file))
    return out


def parse_deb822(text: str, file: Path) -> list[AptSource]:
    """deb822 stanzas (``*.sources``): Types, URIs, Suites, Components, Signed-By, Enabled.
    A Signed-By that embeds a key block is kept as a reference to this file's stanza
    only by its first line; we never need to copy one (see :func:`ensure_suite`)."""
    out = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + line.strip()  # a continuation line
                continue
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by") or None
        out.append(AptSource(tuple(fields.get("uris", "").split()),
                             tuple(fields.get("suites", "").split()),
                             tuple(fields.get("components", "").split()), signed_by, file))
    return out


def configured_sources(etc: Path = ETC_APT) -> list[AptSource]:
    """Every enabled ``deb`` source, in the order apt reads its files."""
    out: list[AptSource] = []
    main_list = etc / "sources.list"
    if main_list.is_file():
        out += parse_one_line(main_list.read_text(), main_list)
    parts = etc / "sources.list.d"
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            out += parse_one_line(path.read_text(), path)
        elif path.suffix == ".sources":
            out += parse_deb822(path.read_text(), path)
    return out


def source_for(suite: str, etc: Path = ETC_APT) -> AptSource | None:
    """The configured source serving ``suite``'s main component, if any."""
    for source in configured_sources(etc):
        if suite in source.suites and "main" in source.components and source.uris:
            return source
    return None


def debian_mirror(etc: Path = ETC_APT, release: str | None = None) -> AptSource:
    """The source that serves the Debian archive here: the one for the host's own suite
    (its URI and keyring serve the archive's other suites too)."""
    release = release if release is not None else host_release()
    source = source_for(release, etc) if release else None
    if source is None:
        raise AptError(f"no apt source for the Debian suite {release or '(unknown release)'} "
                       f"with component main in {etc}/sources.list or sources.list.d")
    return source


def suite_sources_text(suite: str, mirror: AptSource) -> str:
    """A deb822 source for ``suite`` from ``mirror``'s URI, with its keyring when it names a
    file (an inline key is not copied: apt then uses its trusted keyrings)."""
    text = (f"Types: deb\nURIs: {mirror.uris[0]}\nSuites: {suite}\nComponents: main\n")
    if mirror.signed_by and "\n" not in mirror.signed_by:
        text += f"Signed-By: {mirror.signed_by}\n"
    return text


def pin_text(suite: str) -> str:
    return (f"# Added by pyvirtiofsd's tests to fetch packages they unpack (guest kernels,\n"
            f"# reference daemons): never install or upgrade anything from {suite}.\n"
            f"Package: *\nPin: release n={suite}\nPin-Priority: 1\n")


def ensure_suite(suite: str, etc: Path = ETC_APT) -> AptSource:
    """The source serving ``suite``; added (from :func:`debian_mirror`, pinned to priority
    1) and its package list fetched when the machine has none. Needs root to add one."""
    source = source_for(suite, etc)
    if source is not None:
        return source
    if os.geteuid() != 0:
        raise AptError(f"no apt source for {suite}: run as root once to add one")
    mirror = debian_mirror(etc)
    path = etc / "sources.list.d" / f"{ADDED_PREFIX}{suite}.sources"
    pin = etc / "preferences.d" / f"{ADDED_PREFIX}{suite}"
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.write_text(pin_text(suite))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(suite_sources_text(suite, mirror))
    tmp.rename(path)
    update_source(path)
    source = source_for(suite, etc)
    assert source is not None
    return source


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run an apt/dpkg command non-interactively; its stdout, or AptError with stderr."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AptError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                       f"{proc.stderr.strip()}")
    return proc.stdout


def update_source(path: Path) -> None:
    """``apt-get update`` of one sources file only, leaving the other lists alone."""
    run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update",
         "-o", f"Dir::Etc::sourcelist={path}", "-o", "Dir::Etc::sourceparts=-",
         "-o", "APT::Get::List-Cleanup=0"])


def update() -> None:
    if os.geteuid() != 0:
        raise AptError("apt-get update needs root")
    run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"])


def install(packages: list[str]) -> None:
    """``apt-get install`` (updating the lists once if that fails); needs root."""
    if os.geteuid() != 0:
        raise AptError(f"missing host packages; run: apt-get install -y {' '.join(packages)}")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", *packages]
    try:
        run(cmd)
    except AptError:
        update()
        run(cmd)
