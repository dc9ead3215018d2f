"""``python -m pyvirtiofsd``: the same as the ``pyvirtiofsd`` command."""

import sys

from pyvirtiofsd import main

sys.exit(main())
