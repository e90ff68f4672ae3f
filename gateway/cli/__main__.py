"""``python -m gateway.cli``: the same as the ``smg`` console script."""

import sys

from gateway.cli import main

sys.exit(main())
