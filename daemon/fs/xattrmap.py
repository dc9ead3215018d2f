"""virtiofsd's ``--xattrmap`` rule language (``doc/xattr-mapping.md`` in virtiofsd).

A mapping is a sequence of rules, each ``<sep>type<sep>scope<sep>key<sep>prepend<sep>``
where ``<sep>`` is the rule's first non-blank character (any character, the same within
the rule); white space may separate rules. The first rule that matches applies:

* scope ``client`` matches names the guest sends (GETXATTR/SETXATTR/REMOVEXATTR, and the
  --security-label xattr of a new file) whose start is ``key``; ``server`` matches names
  the host lists (LISTXATTR) whose start is ``prepend``; ``all`` does both.
* type ``prefix``: a client name gets ``prepend`` in front; a server name loses it.
  ``ok``: the name passes unchanged. ``bad``: a client name is refused with EPERM (ENODATA
  for GETXATTR), a server name is hidden. ``unsupported``: like bad, but ENOTSUP.
* ``<sep>map<sep>key<sep>prepend<sep>`` is shorthand for ``prefix all key prepend``, then
  (when key is not empty) ``bad all prepend key`` and ``ok all "" ""``, or (key empty)
  ``bad all "" ""``; it must be the last rule.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

CLIENT = 1
SERVER = 2
SCOPES = {b"client": CLIENT, b"server": SERVER, b"all": CLIENT | SERVER}
TYPES = (b"prefix", b"ok", b"bad", b"unsupported", b"map")


class XattrMapError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Rule:
    type: bytes
    scope: int
    key: bytes
    prepend: bytes

    def matches(self, scope: int, name: bytes) -> bool:
        if not self.scope & scope:
            return False
        return name.startswith(self.key if scope == CLIENT else self.prepend)


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    both = CLIENT | SERVER
    rules = [Rule(b"prefix", both, key, prepend)]
    if key:
        rules.append(Rule(b"bad", both, prepend, key))
        rules.append(Rule(b"ok", both, b"", b""))
    else:
        rules.append(Rule(b"bad", both, b"", b""))
    return rules


def _token(data: bytes, pos: int, sep: bytes, number: int) -> tuple[bytes, int]:
    end = data.find(sep, pos)
    if end < 0:
        shown = sep.decode(errors="replace")
        raise XattrMapError(f"rule {number} is incomplete (a rule is {shown}type{shown}scope"
                            f"{shown}key{shown}prepend{shown}, closed by its separator)")
    return data[pos:end], end + 1


def parse(text: str | bytes) -> list[Rule]:
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    data = data.strip()
    rules: list[Rule] = []
    pos = 0
    number = 0
    while pos < len(data):
        if data[pos : pos + 1].isspace():
            pos += 1
            continue
        number += 1
        sep = data[pos : pos + 1]
        pos += 1

        def token(sep: bytes = sep, number: int = number) -> bytes:
            nonlocal pos
            value, pos = _token(data, pos, sep, number)
            return value

        kind = token()
        if kind not in TYPES:
            raise XattrMapError(f"rule {number}: invalid type {kind.decode(errors='replace')!r} "
                                "(expected prefix, ok, bad, unsupported or map)")
        if kind == b"map":
            key, prepend = token(), token()
            if data[pos:].strip():
                raise XattrMapError(f"rule {number}: a map rule must be the last rule")
            rules.extend(_expand_map(key, prepend))
            continue
        scope_text = token()
        scope = SCOPES.get(scope_text)
        if scope is None:
            raise XattrMapError(f"rule {number}: invalid scope "
                                f"{scope_text.decode(errors='replace')!r} (expected client, "
                                "server or all)")
        key, prepend = token(), token()
        if b"\0" in key or b"\0" in prepend:
            raise XattrMapError(f"rule {number}: NUL in a name")
        rules.append(Rule(kind, scope, key, prepend))
    if not rules:
        raise XattrMapError("no rules given")
    return rules


class Refused(OSError):
    """A client name a rule refuses (EPERM for bad, ENOTSUP for unsupported)."""


class XattrMap:
    def __init__(self, text: str | bytes) -> None:
        self.rules = parse(text)
        self.text = text

    def _find(self, scope: int, name: bytes) -> Rule | None:
        for rule in self.rules:
            if rule.matches(scope, name):
                return rule
        return None

    def map_client(self, name: bytes) -> bytes:
        """The host name for a name the guest uses; Refused when a rule forbids it. A name
        no rule matches is refused with EPERM (virtiofsd aborts on an unterminated map)."""
        rule = self._find(CLIENT, name)
        if rule is None or rule.type == b"bad":
            raise Refused(errno.EPERM, f"xattr {name[:64]!r} refused by --xattrmap")
        if rule.type == b"unsupported":
            raise Refused(errno.EOPNOTSUPP, f"xattr {name[:64]!r} unsupported by --xattrmap")
        if rule.type == b"prefix":
            return rule.prepend + name
        return name

    def map_server(self, name: bytes) -> bytes | None:
        """The name the guest sees for a host name, or None if it is hidden."""
        rule = self._find(SERVER, name)
        if rule is None or rule.type in (b"bad", b"unsupported"):
            return None
        if rule.type == b"prefix":
            return name[len(rule.prepend) :]
        return name

    def map_server_list(self, names: list[bytes]) -> list[bytes]:
        out = []
        for name in names:
            mapped = self.map_server(name)
            if mapped:
                out.append(mapped)
        return out
