#!/usr/bin/env python3
"""Stage 1: image folder -> features cache (see captioner/features.py).

Takes exactly the flags of `captioner extract` (run with --help).
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
