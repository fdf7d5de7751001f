"""Ctrl-C in a child process, for the tests that interrupt `extract` and `caption` while their network runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "in the network"  # what the scripts' stand-in network prints on stderr before it blocks


def interrupt_in_the_network(script: Path, args: list[str]) -> tuple[int, str, str, float]:
    """Runs `python script ARGS` with the checkout on its path, sends SIGINT once it prints MARK,
    and returns (exit status, stdout, stderr, seconds from the signal to its exit)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if MARK in line:
            break
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=60)
    return process.returncode, out, "".join(seen) + rest, time.monotonic() - started
