"""The page at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A real uvicorn server on 127.0.0.1 serves the hand-weighted model of tests/model_dirs.py
(its VGG16 swapped for a global average pool, as in tests/test_inference.py). The test
chooses two real photos (from ../shared/flickr8k/images-224 when it is there, else two
generated ones) and a broken file whose name is HTML, reads each caption, the beams and
the error from the page, checks nothing was injected, and saves a screenshot under the
test's temporary folder. Skipped, with the reason, when chromium or Playwright is missing
(`.ci/run` installs chromium).
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.config import Config, DecodeConfig
from captioner.serving.app import create_app
from captioner.serving.model import ModelCaptioner

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k" / "images-224"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
BROKEN_NAME = '<img src=x onerror="window.pwned=1">.jpg'

pytestmark = pytest.mark.slow


def two_photos() -> list[tuple[str, bytes]]:
    """Two real JPEG photos by name; generated textured ones where the shared photos are absent."""
    real = sorted(PHOTOS.glob("*.jpg"))[:2] if PHOTOS.is_dir() else []
    if len(real) == 2:
        return [(path.name, path.read_bytes()) for path in real]
    rng = np.random.default_rng(0)
    photos = []
    for name, tint in (("street.jpg", (60, 90, 160)), ("beach.jpg", (200, 160, 90))):
        pixels = np.clip(rng.normal(tint, 40, size=(240, 320, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photos.append((name, buffer.getvalue()))
    return photos


@pytest.fixture
def sync_playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium browser (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return start


@pytest.fixture
def known_model_dir(tmp_path_factory) -> Path:
    from model_dirs import make_known_model_dir

    return make_known_model_dir(tmp_path_factory.mktemp("known") / "m")


@pytest.fixture
def mean_pixel_net(monkeypatch):
    """VGG16 replaced by a global average pool: features are the mean preprocessed pixel (B, G, R)."""
    import keras

    from captioner.vision import backbones

    inputs = keras.Input((224, 224, 3))
    network = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    monkeypatch.setattr(backbones, "build_backbone", lambda *args, **kwargs: network)
    return network


@pytest.fixture
def server_url(known_model_dir, mean_pixel_net):
    """A real uvicorn server on 127.0.0.1 (a free port) serving the known model; its base URL."""
    import uvicorn

    config = Config()
    config.decode = DecodeConfig(beam_size=2, max_generated_words=5)
    app = create_app(lambda: ModelCaptioner(known_model_dir, config.decode), config)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    listening.close()


def test_the_page_captions_two_photos_and_reports_a_broken_file(sync_playwright, server_url, known_model_dir, tmp_path):
    from captioner.decoding.inference import Captioner

    photos = two_photos()
    decode = DecodeConfig(beam_size=2, max_generated_words=5)
    expected = Captioner(known_model_dir, decode).caption([io.BytesIO(data) for _, data in photos], n_best=2)
    uploads = [{"name": name, "mimeType": "image/jpeg", "buffer": data} for name, data in photos]
    uploads.append({"name": BROKEN_NAME, "mimeType": "image/jpeg", "buffer": b"this is not a JPEG\n"})
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: Playwright's evaluate needs eval, which the page's policy forbids; it also
            # shows that file names are escaped by the page itself, not only stopped by the policy.
            page = browser.new_page(viewport={"width": 1000, "height": 900}, bypass_csp=True)
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server_url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('Ready')", timeout=30_000)
            page.keyboard.press("Tab")  # the drop zone is the first thing the keyboard reaches
            assert page.evaluate("document.activeElement.id") == "drop"
            page.set_input_files("#files", uploads)
            page.wait_for_function(
                "document.querySelectorAll('#results .card:not([data-state=pending])').length === 3", timeout=30_000
            )
            cards = page.evaluate(
                """() => Array.from(document.querySelectorAll('#results .card')).map((card) => ({
                    state: card.dataset.state,
                    name: card.querySelector('.name').textContent,
                    caption: card.querySelector('.caption') ? card.querySelector('.caption').textContent : null,
                    beams: Array.from(card.querySelectorAll('.beam')).map((li) => li.textContent),
                    error: card.querySelector('.error') ? card.querySelector('.error').textContent : null,
                }))"""
            )
            injected = page.evaluate("window.pwned === undefined && !document.querySelector('img[src=x]')")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()

    by_name = {card["name"]: card for card in cards}
    assert set(by_name) == {photos[0][0], photos[1][0], BROKEN_NAME}  # the HTML name shown as text
    for (name, _), outcome in zip(photos, expected):
        card = by_name[name]
        assert card["state"] == "done" and card["error"] is None
        assert card["caption"] == outcome.caption and card["caption"]
        assert [beam.split(" (p = ")[0] for beam in card["beams"]] == [b.caption for b in outcome.beams]
    broken = by_name[BROKEN_NAME]
    assert broken["state"] == "error" and broken["caption"] is None
    assert broken["error"] == f"{BROKEN_NAME}: not an image Pillow can read"
    assert injected, "the page ran or inserted markup from a file name"
    assert all(url.startswith(server_url) or url.startswith("blob:") for url in requested), requested
    assert (tmp_path / "page.png").stat().st_size > 10_000
