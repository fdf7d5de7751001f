#!/usr/bin/env python3
"""Stage 3: features + captions -> model directory (see captioner/training.py).

Takes exactly the flags of `captioner train` (run with --help).
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
