"""``python -m nanoseek ...`` runs the ``nanoseek`` command line."""

import sys

from nanoseek.cli import main

sys.exit(main())
