"""``python -m regsurgery``: the same as the ``regsurgery`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
