"""The one progress display of a running epoch: a line on a terminal, drawn by tqdm.

    epoch 3/30  [#########...........]  212/469 batches  loss 3.2144  3,912 words/s  ETA 0:58

Input: a label per epoch ("epoch 3/30"), the epoch's number of batches (or the target words
of each batch, when known in advance) and, after each batch, the batches done, the running
loss, optionally the words done so far and a note ("reward 0.412"). Output: one line on the
stream, redrawn with a carriage return at most every `min_interval` seconds and always at the
last batch, cleared by `close` so that the log line which follows stands alone. tqdm does the
drawing, the rate limit and the clearing; the line's text is `ProgressBar.line`.

Where it goes (`progress_stream`): by default stderr when stderr is a terminal, else nowhere
(a log file, a pipe, CI). A bar with no stream does nothing. No config; negligible cost.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from tqdm import tqdm


class ProgressBar:
    """One line redrawn while an epoch runs: batches done, running loss, words/s, time left.

    Any loop drives it: `start` per epoch, `update` per batch, `close` before the epoch's log
    line (the training stage through a Keras callback, the fine-tuning loop directly).
    stream: where to draw (None: nowhere, every call is a no-op).
    """

    def __init__(self, stream: TextIO | None, min_interval: float = 0.2, width: int = 20) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.width = width
        self._label = ""
        self._batches = 0
        self._cumulative_words: list[int] | None = None  # per batch, when known in advance
        self._state: dict[str, Any] = {}  # the last update's loss, words, note
        self._started = 0.0
        self._bar: Any = None  # the open tqdm instance, from the epoch's first update

    @property
    def active(self) -> bool:
        return self.stream is not None

    def start(self, label: str, batch_words: Sequence[int] | None = None, batches: int | None = None) -> None:
        """A new epoch: `label` leads the line ("epoch 3/30"); batch_words[i] = target words of
        batch i, or, when they are not known in advance, `batches` = how many batches there are."""
        self.close()
        self._label = label
        if batch_words is not None:
            total, self._cumulative_words = 0, []
            for words in batch_words:
                total += int(words)
                self._cumulative_words.append(total)
            self._batches = len(self._cumulative_words)
        else:
            self._cumulative_words, self._batches = None, int(batches or 0)
        self._started = time.perf_counter()

    def update(self, batches_done: int, loss: float | None = None, words: int | None = None,
               note: str | None = None) -> None:
        """After batch `batches_done` (1-based) of the epoch: the running loss so far; `words`,
        the words done so far when they were not known in advance; `note`, shown before the loss."""
        if self.stream is None:
            return
        self._state = {"loss": loss, "words": words, "note": note}
        if self._bar is None:
            self._bar = _Line(self, total=self._batches, initial=batches_done)  # draws at once
            return
        self._bar.update(batches_done - self._bar.n)  # draws when min_interval has passed
        if batches_done >= self._batches:
            self._bar.refresh()  # the last batch is always drawn

    def line(self, batches_done: int, loss: float | None, seconds: float, words: int | None = None,
             note: str | None = None) -> str:
        """The bar's text after `batches_done` batches and `seconds` of the epoch."""
        total = max(1, self._batches)
        done = min(max(batches_done, 0), total)
        known = self._cumulative_words
        if known is not None:
            words = known[done - 1] if done and known else 0
        filled = self.width * done // total
        parts = [f"{self._label}  [{'#' * filled}{'.' * (self.width - filled)}]  {done}/{total} batches"]
        if note:
            parts.append(note)
        if loss is not None and math.isfinite(loss):
            parts.append(f"loss {loss:.4f}")
        if seconds > 0 and words:
            rate = words / seconds
            parts.append(f"{rate:,.0f} words/s")
            if done < total:
                left = (known[-1] - words) / rate if known else (total - done) * seconds / max(done, 1)
                parts.append(f"ETA {int(left // 60)}:{int(left % 60):02d}")
        return "  ".join(parts)

    def close(self) -> None:
        """Clears the line (nothing was drawn: nothing to clear)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def keras_callback(self) -> Any:
        """A Keras callback that updates this bar after every training batch of a `fit`."""
        import keras

        bar = self

        class _Progress(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                loss = (logs or {}).get("loss")
                bar.update(batch + 1, float(loss) if loss is not None else None)

        return _Progress()


class _Line(tqdm):
    """tqdm drawing `ProgressBar.line` instead of its own meter."""

    monitor_interval = 0  # no monitor thread: every batch updates the bar

    def __init__(self, owner: ProgressBar, total: int, initial: int) -> None:
        self._owner = owner
        super().__init__(total=total, initial=initial, file=owner.stream, leave=False, disable=False,
                         mininterval=owner.min_interval, miniters=1)

    def __str__(self) -> str:
        owner = self._owner
        state = owner._state
        seconds = time.perf_counter() - owner._started
        return owner.line(self.n, state.get("loss"), seconds, state.get("words"), state.get("note"))


def progress_stream(progress: bool | TextIO | None) -> TextIO | None:
    """Where the progress bar goes: None (the default) = stderr when it is a terminal, else nowhere
    (logs, pipes, CI); False = nowhere; True = stderr; a text stream = that stream."""
    if progress is None:
        return sys.stderr if sys.stderr is not None and sys.stderr.isatty() else None
    if progress is True:
        return sys.stderr
    if progress is False:
        return None
    return progress
