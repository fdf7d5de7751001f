"""Shared fixtures: the optional real Flickr8k files beside the project, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


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
