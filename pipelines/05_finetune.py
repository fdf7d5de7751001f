#!/usr/bin/env python3
"""Stage 5 (optional): self-critical fine-tuning (SCST) on CIDEr-D of a trained model (see captioner/finetune.py).

Takes exactly the flags of `captioner finetune` (run with --help):
    --model MODEL_DIR --features FILE [FILE ...] --captions DIR --output NEW_DIR [--resume] [--force]
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
