"""``python -m deploykit``: see :mod:`deploykit.cli`."""

import sys

from deploykit.cli import main

sys.exit(main())
