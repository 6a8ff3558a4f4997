#!/usr/bin/env python
"""Train a byte-level BPE tokenizer and a Transformer LM on TinyStories end to end, then sample.

    python examples/train_tinystories.py                      # the default preset (handout with CUDA, cpu-small without)
    python examples/train_tinystories.py --preset cpu-small \\
        --train-text ../shared/data/tinystories/train.txt --valid-text ../shared/data/tinystories/valid.txt

The same as ``flm train …``: every flag of ``flm train --help`` works here.
"""

import sys

from flm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
