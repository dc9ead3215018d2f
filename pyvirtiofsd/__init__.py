"""The ``pyvirtiofsd`` command: finds the daemon's own packages and starts it.

The daemon's top-level names (``daemon``, ``workers``, ``shm_table``, ``supervisor``) are
common words: python-daemon, for one, installs a top-level ``daemon`` package. So an
installed wheel keeps them out of site-packages, in this package's own directory
(``site-packages/pyvirtiofsd/``), and only this launcher puts that directory first on
``sys.path``. Another distribution's ``daemon`` then neither hides ours nor is hidden by
it for any other program. In the source tree (and an editable install) the same names sit
in the repository root, one directory up. Importing this module changes nothing; only
:func:`main` (and :func:`activate`) do.
"""

from __future__ import annotations

import os
import sys

OWN_TOP_LEVEL = ("daemon", "workers", "shm_table", "supervisor")


def root() -> str:
    """The directory holding ``supervisor.py`` and the daemon's packages: beside this file
    in an installed wheel, the repository root in a source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "supervisor.py")):
        return here
    return os.path.dirname(here)


def activate() -> str:
    """Put :func:`root` first on ``sys.path`` so the daemon's packages are found before
    any other distribution's of the same name; returns it.

    Refuses when another ``daemon`` (or workers, ...) was imported into this process
    already: both cannot live under one name in one interpreter."""
    path = root()
    for name in OWN_TOP_LEVEL:
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if module is not None and (where is None or not os.path.abspath(where).startswith(
                path + os.sep)):
            raise ImportError(f"pyvirtiofsd: a module named {name!r} from {where or module!r} "
                              f"is already imported; pyvirtiofsd's own is in {path}")
    sys.path[:] = [path] + [p for p in sys.path if os.path.abspath(p or ".") != path]
    return path


def main() -> int:
    """Entry point of the ``pyvirtiofsd`` console script (and ``python -m pyvirtiofsd``)."""
    activate()
    from supervisor import main as supervisor_main

    return supervisor_main()
