#!/usr/bin/env python3
"""Export: a trained model directory -> a bundle that captions without TensorFlow (see captioner/stages/export.py).

Takes exactly the flags of `captioner export` (run with --help).
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
