"""Shared fixtures: the optional real Flickr8k files beside the project, small helpers."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


@pytest.fixture(autouse=True)
def no_stale_log_handler():
    """The CLI installs a log handler on the stderr pytest captured for that test, which is closed
    after it: removed after every test, so later tests' log lines do not fail on a closed stream."""
    import logging

    yield
    logging.getLogger().handlers.clear()


@pytest.fixture
def shared_flickr8k() -> Path:
    """../shared/flickr8k when it exists beside the checkout; the test is skipped otherwise."""
    if not (SHARED / "Flickr8k.token.txt").is_file():
        pytest.skip("../shared/flickr8k is not present")
    return SHARED


@pytest.fixture
def shared_images(shared_flickr8k: Path) -> Path:
    folder = shared_flickr8k / "images"
    if not any(folder.glob("*.jpg")):
        pytest.skip("../shared/flickr8k/images is empty")
    return folder


@contextlib.contextmanager
def limit_file_size(max_bytes: int):
    """Lowers this process's file-size limit (RLIMIT_FSIZE, `ulimit -f`) for the block.

    A write past it fails with EFBIG (Python ignores SIGXFSZ), as on a full disk, even for
    root, which file permissions do not stop. The soft limit is restored afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def file_size_limit():
    """`with file_size_limit(N):` makes every write past N bytes fail (see `limit_file_size`)."""
    return limit_file_size


@pytest.fixture
def disk_full():
    """`disk_full(path)` makes the next atomic write of `path` by this process meet a full disk (ENOSPC).

    Our atomic writes go through a temporary name beside the target
    (`captioner.cache._temporary_name`); pointing it at /dev/full makes the write fail with
    ENOSPC as on a full disk, while the target itself stays as it was.
    """
    from captioner import cache

    made = []

    def arrange(path: Path) -> Path:
        tmp = cache._temporary_name(Path(path))
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.symlink_to("/dev/full")
        made.append(tmp)
        return tmp

    yield arrange
    for tmp in made:
        if tmp.is_symlink():
            tmp.unlink()


@pytest.fixture(scope="session")
def random_vgg16():
    """VGG16 cut at fc2 with random weights ("none": seeded, the network `caption` rebuilds for a
    demo model), built once per test session: float32 [B, 224, 224, 3] -> float32 [B, 4096].
    Building one costs seconds; tests must not change its weights."""
    from captioner.vision.backbones import build_backbone

    return build_backbone("vgg16", "fc2", "none")
