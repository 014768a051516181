"""``python -m nanoseek ...`` runs the ``nanoseek`` command line."""

from nanoseek.cli import main

raise SystemExit(main())
