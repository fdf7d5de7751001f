#!/usr/bin/env python3
"""Stage 4: caption a split, score BLEU-1..4 and CIDEr-D, write the HTML report (see captioner/evaluation.py).

Takes exactly the flags of `captioner evaluate` (run with --help).
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
