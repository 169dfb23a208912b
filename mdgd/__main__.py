"""``python -m mdgd``: the same as the ``mdgd`` console script."""

import sys

from mdgd.cli import main

sys.exit(main())
