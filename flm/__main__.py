"""``python -m flm …`` runs the ``flm`` command line (see :mod:`flm.cli`)."""

import sys

from flm.cli import main

if __name__ == "__main__":
    sys.exit(main())
