"""`python -m xlaserve.cli ...`: the same as the `xlaserve` console script."""

import sys

from xlaserve.cli import main

sys.exit(main())
