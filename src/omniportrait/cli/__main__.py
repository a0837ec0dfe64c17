"""``python -m omniportrait.cli`` runs the command line."""

import sys

from omniportrait.cli import main

sys.exit(main())
