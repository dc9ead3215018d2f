"""In-daemon uid/gid translation between guest and host (virtiofsd's ``--translate-uid`` /
``--translate-gid``, its "soft" id map: no user namespace needed).

Each option is ``<type>:<a>:<b>:<count>``; the separator is the first character after
the type name that is not alphanumeric, ``-`` or ``_`` (any such character, the same for
every field). Types, as in virtiofsd 1.13:

* ``guest:<guest base>:<host base>:<count>`` maps guest ids to host ids 1:1 (requests);
* ``host:<host base>:<guest base>:<count>`` maps host ids to guest ids 1:1 (replies);
* ``squash-guest:<guest base>:<host id>:<count>`` maps a guest range onto one host id;
* ``squash-host:<host base>:<guest id>:<count>`` maps a host range onto one guest id;
* ``forbid-guest:<guest base>:<count>``: using these guest ids fails with EPERM;
* ``map:<guest base>:<host base>:<count>``: both directions, 1:1.

Ids in no range map to themselves. Ranges of one direction may not overlap.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

U32_END = 1 << 32
TYPES = ("guest", "host", "squash-guest", "squash-host", "forbid-guest", "map")


class IdMapError(ValueError):
    pass


class ForbiddenId(PermissionError):
    """A guest id that ``forbid-guest`` excludes: the request fails with EPERM."""

    def __init__(self, kind: str, ident: int) -> None:
        super().__init__(errno.EPERM, f"use of guest {kind} {ident} has been configured to fail")


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed command-line entry."""

    type: str
    values: tuple[int, ...]

    def __str__(self) -> str:
        return ":".join([self.type, *map(str, self.values)])


def parse_rule(text: str) -> Rule:
    """Parse ``<type><sep><n><sep><n>...`` like virtiofsd's soft_idmap command line."""
    prefix = []
    sep = None
    for i, ch in enumerate(text):
        if ch.isalnum() or ch in "-_":
            prefix.append(ch.lower())
        else:
            sep = ch
            rest = text[i + 1 :]
            break
    if sep is None:
        raise IdMapError(f"{text!r}: expected <type>:<from>:<to>:<count> (types: "
                         f"{', '.join(TYPES)})")
    kind = "".join(prefix)
    if kind not in TYPES:
        raise IdMapError(f"{text!r}: invalid ID map type {kind!r} (expected one of "
                         f"{', '.join(TYPES)})")
    values = []
    for field_text in rest.split(sep):
        try:
            if not field_text.isdigit():  # no sign, no spaces, no underscores
                raise ValueError(field_text)
            value = int(field_text)
            if value >= U32_END:
                raise ValueError(field_text)
        except ValueError:
            raise IdMapError(f"{text!r}: invalid value {field_text!r} (expected an "
                             "unsigned 32-bit integer)") from None
        values.append(value)
    expected = 2 if kind == "forbid-guest" else 3
    if len(values) != expected:
        raise IdMapError(f"{text!r}: {kind} takes {expected} numbers, got {len(values)}")
    return Rule(kind, tuple(values))


@dataclass(slots=True)
class _Entry:
    start: int
    end: int  # exclusive
    action: str  # "range" | "squash" | "fail"
    target: int = 0


@dataclass(slots=True)
class _Direction:
    name: str
    entries: list[_Entry] = field(default_factory=list)

    def add(self, entry: _Entry, rule: Rule) -> None:
        for other in self.entries:
            if entry.start < other.end and other.start < entry.end:
                raise IdMapError(f"{rule}: {self.name} mapping [{entry.start}, {entry.end}) "
                                 f"intersects the earlier [{other.start}, {other.end})")
        self.entries.append(entry)

    def lookup(self, ident: int) -> _Entry | None:
        for entry in self.entries:
            if entry.start <= ident < entry.end:
                return entry
        return None


def _range(base: int, count: int, rule: Rule) -> tuple[int, int]:
    if base + count > U32_END:
        raise IdMapError(f"{rule}: range overflows 32 bits")
    return base, base + count


class IdMap:
    """uid or gid translation, each direction independent of the other."""

    def __init__(self, kind: str, rules: list[Rule]) -> None:
        self.kind = kind
        self.to_host = _Direction("guest-to-host")
        self.to_guest = _Direction("host-to-guest")
        for rule in rules:
            v = rule.values
            if rule.type == "guest":
                self.to_host.add(_Entry(*_range(v[0], v[2], rule), "range", v[1]), rule)
            elif rule.type == "host":
                self.to_guest.add(_Entry(*_range(v[0], v[2], rule), "range", v[1]), rule)
            elif rule.type == "squash-guest":
                self.to_host.add(_Entry(*_range(v[0], v[2], rule), "squash", v[1]), rule)
            elif rule.type == "squash-host":
                self.to_guest.add(_Entry(*_range(v[0], v[2], rule), "squash", v[1]), rule)
            elif rule.type == "map":
                self.to_host.add(_Entry(*_range(v[0], v[2], rule), "range", v[1]), rule)
                self.to_guest.add(_Entry(*_range(v[1], v[2], rule), "range", v[0]), rule)
            else:  # forbid-guest
                self.to_host.add(_Entry(*_range(v[0], v[1], rule), "fail"), rule)
        for entry in self.to_host.entries + self.to_guest.entries:
            if entry.action == "range" and entry.target + (entry.end - entry.start) > U32_END:
                raise IdMapError(f"{kind} map: target range of [{entry.start}, {entry.end}) "
                                 "overflows 32 bits")

    @classmethod
    def parse(cls, kind: str, texts: list[str]) -> IdMap:
        return cls(kind, [parse_rule(t) for t in texts])

    def guest_to_host(self, ident: int) -> int:
        """A guest id as the host should see it; ForbiddenId (EPERM) for forbid-guest."""
        entry = self.to_host.lookup(ident)
        if entry is None:
            return ident
        if entry.action == "range":
            return entry.target + ident - entry.start
        if entry.action == "squash":
            return entry.target
        raise ForbiddenId(self.kind, ident)

    def host_to_guest(self, ident: int) -> int:
        entry = self.to_guest.lookup(ident)
        if entry is None:
            return ident
        if entry.action == "range":
            return entry.target + ident - entry.start
        return entry.target
