"""``python -m lifecycle``: the ``lifecycle`` script, as ``python -m lifecycle.cli`` is."""

import sys

from lifecycle.cli import main

sys.exit(main())
