"""Starting the deep-learning runtime without its start-up chatter on stderr.

Importing TensorFlow (Keras' default backend) on a machine without a GPU prints lines
such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 00:00:... cuda_executor.cc:...] failed call to cuInit: INTERNAL: CUDA error ...

They come from C++ (absl) logging that runs before TensorFlow reads
TF_CPP_MIN_LOG_LEVEL, so no environment variable silences all of them; they bury
our own one-line errors and alarm users. `import_keras()` imports Keras (and with it
the backend) and initialises the backend's devices with file descriptor 2 pointed at
a temporary file, then writes back to stderr only the lines that are not such
chatter: a real problem during the import is still shown. The CLI calls it before
any stage that needs Keras; later imports of keras are then silent.

Ctrl-C while the runtime computes: `run_interruptibly` runs a stage in a worker thread so
that the main thread stops the process within a fraction of a second (exit 130), instead of
after the network's current batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Lines of start-up chatter: absl-format C++ log lines (I/W/E + MMDD), absl's preamble,
# TensorFlow's CPU-feature and oneDNN notices.
_CHATTER = re.compile(
    r"^(?:[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions:"
    r"|This TensorFlow binary is optimized"
    r"|oneDNN custom operations are on"
    r"|INFO: Created TensorFlow Lite \S+ delegate for CPU\."
    r"|\s*$)"
)
_started = False


def is_chatter(line: str) -> bool:
    """Whether one stderr line is the runtime's start-up chatter (see the module docstring)."""
    return bool(_CHATTER.match(line))


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Collects what is written to file descriptor 2 in the block; re-emits all but chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines() if not is_chatter(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def import_keras() -> Any:
    """Imports keras and starts its backend's devices quietly; returns the keras module.

    Also lowers TensorFlow's own Python and C++ log levels (warnings and errors that
    matter still reach the log). Safe to call more than once.
    """
    global _started
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _started:
        import keras

        return keras
    with quiet_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.get_logger().setLevel(logging.ERROR)
            tf.config.list_physical_devices()  # device initialisation prints its own lines (cuInit)
    _started = True
    return keras


def device_description() -> str:
    """Which device the Keras backend computes on, in words: "the CPU (tensorflow)", "GPU 0 (jax)"."""
    keras = import_keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return f"GPU {gpus[0].name} ({backend})" if gpus else f"the CPU ({backend})"
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"the CPU ({backend})" if device.platform == "cpu" else f"{device.platform.upper()} {device.id} ({backend})"
    return backend


def run_interruptibly(work: Callable[[], T], on_interrupt: Callable[[], None]) -> T:
    """Runs `work()` in a worker thread while this (main) thread waits for it; returns its result
    or raises its exception.

    Why: Python handles Ctrl-C (SIGINT) only in the main thread, and only between bytecodes. A
    main thread inside TensorFlow or LiteRT (a batch through VGG16, a conversion) sees it when
    that call returns, seconds later. Waiting here instead, the main thread takes Ctrl-C at
    once: it calls `on_interrupt()` (release locks, remove temporaries, say one line), flushes
    stdout and stderr, and ends the process with exit status 130 without waiting for the
    worker, which cannot be stopped inside a native call (`os._exit`: no Python clean-up runs
    after `on_interrupt`). Called from another thread, `work` simply runs there.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error

    worker = threading.Thread(target=target, name="captioner-work", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        try:
            on_interrupt()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(130)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes (None where the OS does not say): the bound a model's
    training memory is checked against before it is built."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None
