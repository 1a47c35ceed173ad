"""``python -m localdiff``: the same command line as ``localdiff``."""

import sys

from localdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
