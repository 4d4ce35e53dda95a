"""``python -m karyo`` is the ``karyo`` command."""

import sys

from karyo.cli import main

sys.exit(main())
