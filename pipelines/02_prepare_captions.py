#!/usr/bin/env python3
"""Stage 2: token file/splits or Karpathy JSON -> cleaned captions + tokenizer (see captioner/datasets.py).

Takes exactly the flags of `captioner prepare` (run with --help).
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
