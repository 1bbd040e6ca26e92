"""``python -m ecqae``: see ecqae.cli."""

import sys

from .cli import main

sys.exit(main())
