"""``python -m flm.tokenizer train|encode …``: the ``flm tokenize`` command (see :mod:`flm.cli.tools`)."""

import sys

from flm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
