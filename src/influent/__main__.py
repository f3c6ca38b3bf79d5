"""``python -m influent`` (and ``torchrun --nproc-per-node N -m influent ...``): the command line."""

import sys

from influent.cli import main

sys.exit(main())
