"""``python -m flm.tokenizer`` is no longer a command: it says to run ``flm tokenize`` (the one
command line is ``flm``; nothing imports :mod:`flm.cli`, issue 20)."""

import sys

if __name__ == "__main__":
    print(
        "error: python -m flm.tokenizer is no longer a command; run: flm tokenize … (or python -m flm tokenize …)",
        file=sys.stderr,
    )
    sys.exit(2)
