"""``python -m influent.cli``."""

import sys

from influent.cli import main

sys.exit(main())
