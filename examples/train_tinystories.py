#!/usr/bin/env python
"""Train a byte-level BPE tokenizer and a Transformer LM on TinyStories, end to end, then sample.

    python examples/train_tinystories.py                      # the handout run (downloads the data)
    python examples/train_tinystories.py --preset cpu-small \\
        --train-text ../shared/data/tinystories/train.txt --valid-text ../shared/data/tinystories/valid.txt

Every flag overrides the preset; see ``--help``. The stages and their caching are described in
``flm/pipeline.py``; the training loop is ``flm.train.train_loop``.
"""

import sys

from flm.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
