"""``python -m bnfreeze``: the same command as the ``bnfreeze`` console script."""

import sys

from bnfreeze._cli import main

if __name__ == "__main__":
    sys.exit(main())
