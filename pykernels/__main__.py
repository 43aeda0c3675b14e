"""``python -m pykernels``: the command line of pykernels.app.cli."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
