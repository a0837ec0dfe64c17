"""``python -m omniportrait`` runs the command line."""

import sys

from omniportrait.cli import main

sys.exit(main())
