"""``python -m qadapt.cli``."""

import sys

from qadapt.cli.main import main

sys.exit(main())
