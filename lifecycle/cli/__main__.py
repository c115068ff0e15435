"""``python -m lifecycle.cli``: the ``lifecycle`` script."""

import sys

from lifecycle.cli import main

sys.exit(main())
