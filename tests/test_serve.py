"""captioner.serving.serve through FastAPI's TestClient: every endpoint, every limit, the per-image
error slots, micro-batching under concurrent requests, the MAX shapes, CORS, the page's files.

Most tests use `ColourModel`, a fake `CaptionModel` whose captions name an image's dominant
colour, so a caption in the wrong slot is seen at once. Two tests serve a real tiny model
directory (its VGG16 swapped for a tiny seeded network, as in tests/test_inference.py).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner.cli import main
from captioner.config import Config, DecodeConfig
from captioner.decoding.inference import Beam
from captioner.errors import CaptionerError
from captioner.serving.app import create_app
from captioner.serving.model import ModelCaptioner

STATIC = Path(__file__).resolve().parents[1] / "captioner" / "serving" / "static"


class ColourModel:
    """A fake CaptionModel: features are the mean RGB of a 16x16 image; its beams are
    "a red photo" (log-prob -0.5), "a red picture" (-1.0), "a red image" (-2.0), ...
    cut to max_generated_words. Counts and sizes every backbone and decoder call."""

    image_size = (16, 16)
    resample = "nearest"
    WORDS = ("photo", "picture", "image", "scene", "view")
    LOG_PROBS = (-0.5, -1.0, -2.0, -3.0, -4.0)

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.extract_sizes: list[int] = []
        self.decode_sizes: list[int] = []
        self.fail_next = False
        self.lock = threading.Lock()

    def extract(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
        with self.lock:
            self.extract_sizes.append(len(images))
        time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("backbone exploded")
        return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        self.decode_sizes.append(len(image_features))
        names = ("red", "green", "blue")
        results = []
        for row in image_features:
            colour = names[int(np.argmax(row))]
            beams = []
            for word, log_prob in list(zip(self.WORDS, self.LOG_PROBS))[:beam_size]:
                beams.append(Beam(" ".join(["a", colour, word][:max_generated_words]), log_prob))
            results.append(beams)
        return results

    def metadata(self) -> dict:
        return {"id": "colour", "name": "colour fake", "description": "test", "license": "", "type": "Image-to-Text Translation",
                "source": "", "backbone": {"backbone": "none"}, "vocab_size": 7}


def image_bytes(colour=(220, 20, 20), size=(40, 30), fmt="JPEG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


RED, GREEN, BLUE = image_bytes((220, 20, 20)), image_bytes((20, 200, 20), fmt="PNG"), image_bytes((10, 10, 230), fmt="WEBP")


def config_with(**serve) -> Config:
    config = Config()
    for key, value in serve.items():
        setattr(config.serve, key, value)
    return config


@pytest.fixture
def fake():
    return ColourModel()


@pytest.fixture
def client(fake):
    with client_for(create_app(lambda: fake, config_with(batch_window_ms=0))) as test_client:
        wait_ready(test_client)
        yield test_client


def client_for(app) -> TestClient:
    """A TestClient that calls the app by one of its default Host names (TestClient's own, "testserver", is refused)."""
    return TestClient(app, base_url="http://localhost")


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model never became ready"
        time.sleep(0.01)


def files(*items: tuple[str, bytes]) -> list:
    return [("image", (name, data, "application/octet-stream")) for name, data in items]


# --------------------------------------------------------------------------- health, readiness


def test_ready_is_503_until_the_model_is_loaded_and_live_answers_meanwhile():
    release = threading.Event()

    def slow_load():
        release.wait(10)
        return ColourModel()

    with client_for(create_app(slow_load, config_with(batch_window_ms=0))) as client:
        assert client.get("/health/live").json() == {"status": "live"}
        assert client.get("/v2/health/live").status_code == 200
        loading = client.get("/health/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert client.get("/v2/health/ready").status_code == 503
        refused = client.post("/v1/captions", files=files(("red.jpg", RED)))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert client.get("/model/metadata").status_code == 503
        release.set()
        wait_ready(client)
        assert client.get("/health/ready").json() == {"status": "ready"}
        assert client.post("/v1/captions", files=files(("red.jpg", RED))).status_code == 200


def test_a_model_that_fails_to_load_is_reported_by_ready():
    reported = []

    def broken():
        raise CaptionerError("models/x is missing model.keras")

    with client_for(create_app(broken, on_load_error=reported.append)) as client:
        deadline = time.monotonic() + 10
        while not reported and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = client.get("/health/ready")
        assert answer.status_code == 503 and answer.json()["status"] == "failed"
        assert "models/x is missing model.keras" in answer.json()["message"]
        assert reported == ["models/x is missing model.keras"]
        assert "failed to load" in client.post("/v1/captions", files=files(("a.jpg", RED))).json()["message"]


# --------------------------------------------------------------------------- /v1/captions


def test_captions_in_request_order_with_a_bad_image_in_its_own_slot(client):
    answer = client.post(
        "/v1/captions", files=files(("red.jpg", RED), ("notes.jpg", b"not an image at all\n"), ("green.png", GREEN), ("blue.webp", BLUE))
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["beam_size"] == 3 and body["max_words"] == 30  # DecodeConfig's defaults
    slots = body["images"]
    assert [s["index"] for s in slots] == [0, 1, 2, 3]
    assert [s["file_name"] for s in slots] == ["red.jpg", "notes.jpg", "green.png", "blue.webp"]
    assert [s["caption"] for s in slots] == ["a red photo", None, "a green photo", "a blue photo"]
    assert slots[1]["error"] == {"status": 400, "message": "notes.jpg: not an image Pillow can read"}
    assert slots[1]["beams"] == [] and slots[1]["log_prob"] is None
    red = slots[0]
    assert red["error"] is None and red["log_prob"] == -0.5
    assert [b["caption"] for b in red["beams"]] == ["a red photo", "a red picture", "a red image"]
    assert [b["log_prob"] for b in red["beams"]] == [-0.5, -1.0, -2.0]
    assert [b["probability"] for b in red["beams"]] == pytest.approx([0.606531, 0.367879, 0.135335], abs=1e-6)


def test_decode_settings_are_query_parameters_within_bounds(client, fake):
    one = client.post("/v1/captions?beam_size=1&max_words=2", files=files(("red.jpg", RED))).json()
    assert one["beam_size"] == 1 and one["max_words"] == 2
    assert [b["caption"] for b in one["images"][0]["beams"]] == ["a red"]
    five = client.post("/v1/captions?beam_size=5", files=files(("red.jpg", RED))).json()
    assert len(five["images"][0]["beams"]) == 5
    calls = len(fake.extract_sizes)
    for query in ("beam_size=6", "beam_size=0", "max_words=41", "max_words=0", "beam_size=two"):
        refused = client.post(f"/v1/captions?{query}", files=files(("red.jpg", RED)))
        assert refused.status_code == 422, query
    assert len(fake.extract_sizes) == calls  # refused before any work


def test_max_words_over_what_the_model_can_decode_is_422_before_any_work():
    """A transformer decodes at most model.max_positions - 1 words (the served model's `max_words`)."""
    limited = ColourModel()
    limited.max_words = 3
    with client_for(create_app(lambda: limited, config_with(batch_window_ms=0))) as test_client:
        wait_ready(test_client)
        refused = test_client.post("/v1/captions?max_words=4", files=files(("red.jpg", RED)))
        assert refused.status_code == 422
        assert refused.json() == {"status": "error", "message": "max_words 4 is over the 3 words this model can decode"}
        assert limited.extract_sizes == []
        assert test_client.post("/v1/captions?max_words=3", files=files(("red.jpg", RED))).status_code == 200


def test_empty_and_truncated_uploads_get_400_in_their_slots(client):
    whole = image_bytes(size=(300, 200))
    slots = client.post(
        "/v1/captions", files=files(("empty.jpg", b""), ("cut.jpg", whole[: len(whole) // 3]), ("red.jpg", RED))
    ).json()["images"]
    assert slots[0]["error"] == {"status": 400, "message": "empty.jpg: empty file (0 bytes)"}
    assert slots[1]["error"]["status"] == 400 and slots[1]["error"]["message"].startswith("cut.jpg: ")
    assert slots[2]["caption"] == "a red photo"


def test_file_names_are_shown_without_their_folders_and_control_characters(client):
    slots = client.post(
        "/v1/captions",
        files=files(("../../etc/passwd", b"x"), ("C:\\photos\\cat.jpg", RED), ("\x1b[31m", RED), ("say %22cheese%22.jpg", RED)),
    ).json()["images"]
    assert [s["file_name"] for s in slots] == ["passwd", "cat.jpg", "[31m", 'say "cheese".jpg']


def test_requests_that_are_not_multipart_or_have_no_image_are_refused(client):
    not_multipart = client.post("/v1/captions", content=RED, headers={"content-type": "image/jpeg"})
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["message"]
    no_image = client.post("/v1/captions", files=[("photo", ("red.jpg", RED, "image/jpeg"))])
    assert no_image.status_code == 400 and "no 'image' field" in no_image.json()["message"]
    malformed = client.post(
        "/v1/captions", content=b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nxx\r\n--bX",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert malformed.status_code == 400 and malformed.json()["status"] == "error"  # never a 500
    assert client.get("/health/live").status_code == 200


# --------------------------------------------------------------------------- limits


def test_an_upload_over_the_byte_limit_is_refused_in_its_slot_and_the_others_captioned(fake):
    big = image_bytes((220, 20, 20), size=(600, 600), fmt="PNG") + b"\0" * 5000
    assert len(big) > 5000
    with client_for(create_app(lambda: fake, config_with(max_upload_bytes=len(RED) + 10, batch_window_ms=0))) as client:
        wait_ready(client)
        slots = client.post("/v1/captions", files=files(("big.png", big), ("red.jpg", RED))).json()["images"]
    assert slots[0]["error"]["status"] == 413 and "serve.max_upload_bytes" in slots[0]["error"]["message"]
    assert slots[1]["caption"] == "a red photo"
    assert fake.extract_sizes == [1]  # the big one never reached the backbone


def test_a_request_over_the_total_byte_limit_is_refused_whole(fake):
    config = config_with(max_upload_bytes=1000, max_images=2, batch_window_ms=0)
    with client_for(create_app(lambda: fake, config)) as client:
        wait_ready(client)
        answer = client.post("/v1/captions", files=files(("a.jpg", b"\xff" * 40_000), ("b.jpg", b"\xff" * 40_000)))
        assert answer.status_code == 413 and "byte limit" in answer.json()["message"]
        # Without Content-Length (chunked), the limit is applied as the bytes stream in.
        body = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n", b"\xff" * 80_000])
        streamed = client.post(
            "/v1/captions", content=iter([body[i : i + 4096] for i in range(0, len(body), 4096)]),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert streamed.status_code == 413
        assert client.post("/v1/captions", files=files(("red.jpg", b"\xff" * 10))).status_code == 200
    assert fake.extract_sizes == []


def test_more_images_than_allowed_are_refused_whole(fake):
    with client_for(create_app(lambda: fake, config_with(max_images=2, batch_window_ms=0))) as client:
        wait_ready(client)
        answer = client.post("/v1/captions", files=files(("a.jpg", RED), ("b.jpg", RED), ("c.jpg", RED)))
    assert answer.status_code == 413 and answer.json()["message"] == "more than 2 images in one request (serve.max_images)"
    assert fake.extract_sizes == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_refused_before_decoding(fake, monkeypatch):
    from captioner.data import images  # the server decodes through images.load_image

    decoded = []
    real_load = images.load_image
    monkeypatch.setattr(images, "load_image", lambda handle, **kw: decoded.append(handle.name) or real_load(handle, **kw))
    bomb = image_bytes(0, size=(5000, 5000), fmt="PNG", mode="1")  # 25 megapixels in a few kB
    huge = image_bytes(0, size=(15_000, 15_000), fmt="PNG", mode="1")  # over twice Pillow's own limit too
    assert len(bomb) < 10_000 and len(huge) < 50_000
    with client_for(create_app(lambda: fake, config_with(max_pixels=1_000_000, batch_window_ms=0))) as client:
        wait_ready(client)
        slots = client.post("/v1/captions", files=files(("bomb.png", bomb), ("red.jpg", RED), ("huge.png", huge))).json()["images"]
    assert slots[0]["error"] == {
        "status": 413, "message": "bomb.png: 5000x5000 is over the 1000000-pixel limit (serve.max_pixels)"
    }
    assert slots[1]["caption"] == "a red photo"
    assert slots[2]["error"]["status"] == 413 and slots[2]["error"]["message"].startswith("huge.png: ")
    assert decoded == ["red.jpg"]  # neither bomb was handed to the decoder


def test_formats_outside_the_accepted_list_get_415_in_their_slot(client):
    tiff = image_bytes(fmt="TIFF")
    slots = client.post("/v1/captions", files=files(("scan.tif", tiff), ("red.jpg", RED))).json()["images"]
    assert slots[0]["error"] == {
        "status": 415, "message": "scan.tif: TIFF images are not accepted (serve.formats: JPEG, PNG, WEBP, GIF, BMP)"
    }
    assert slots[1]["caption"] == "a red photo"


def test_a_request_slower_than_the_timeout_gets_503_and_the_server_keeps_serving():
    slow = ColourModel(delay_s=0.8)
    with client_for(create_app(lambda: slow, config_with(request_timeout_s=0.2, batch_window_ms=0))) as client:
        wait_ready(client)
        started = time.monotonic()
        answer = client.post("/v1/captions", files=files(("red.jpg", RED)))
        assert answer.status_code == 503 and "serve.request_timeout_s" in answer.json()["message"]
        assert time.monotonic() - started < 0.7
        slow.delay_s = 0.0
        time.sleep(0.8)  # the timed-out batch finishes in the background
        assert client.post("/v1/captions", files=files(("red.jpg", RED))).json()["images"][0]["caption"] == "a red photo"


def test_a_full_queue_answers_503_at_once():
    blocked = ColourModel(delay_s=0.6)
    config = config_with(max_queued_images=1, batch_window_ms=0, max_batch=1)
    with client_for(create_app(lambda: blocked, config)) as client:
        wait_ready(client)
        answers = {}
        first = threading.Thread(target=lambda: answers.setdefault("a", client.post("/v1/captions", files=files(("a.jpg", RED)))))
        first.start()
        time.sleep(0.2)  # "a" is in the backbone; the queue has room for one more
        answers["b"] = client.post("/v1/captions", files=files(("b.jpg", RED), ("c.jpg", RED)))
        first.join()
    assert answers["a"].status_code == 200
    assert answers["b"].status_code == 503 and "busy" in answers["b"].json()["message"]


def test_a_model_failure_answers_500_and_the_next_request_is_served(client, fake):
    fake.fail_next = True
    failed = client.post("/v1/captions", files=files(("red.jpg", RED)))
    assert failed.status_code == 500 and failed.json()["message"] == "captioning failed: RuntimeError: backbone exploded"
    assert client.post("/v1/captions", files=files(("red.jpg", RED))).status_code == 200


# --------------------------------------------------------------------------- micro-batching


def test_concurrent_requests_share_one_backbone_call_and_one_decoder_call(fake):
    config = config_with(batch_window_ms=1000, max_batch=16)
    colours = [("red.jpg", RED), ("green.png", GREEN), ("blue.webp", BLUE)] * 2
    with client_for(create_app(lambda: fake, config)) as client:
        wait_ready(client)
        answers: list = [None] * len(colours)
        start = threading.Barrier(len(colours))

        def post(i: int) -> None:
            start.wait()
            answers[i] = client.post("/v1/captions", files=files(colours[i]))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(colours))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert fake.extract_sizes == [6] and fake.decode_sizes == [6]
    assert [a.json()["images"][0]["caption"] for a in answers] == ["a red photo", "a green photo", "a blue photo"] * 2


def test_batches_never_exceed_max_batch_and_split_by_decode_settings(fake):
    with client_for(create_app(lambda: fake, config_with(batch_window_ms=300, max_batch=4))) as client:
        wait_ready(client)
        answers = {}
        first = threading.Thread(target=lambda: answers.setdefault(
            "beam2", client.post("/v1/captions?beam_size=2", files=files(("g.png", GREEN), ("b.webp", BLUE)))))
        first.start()
        answers["many"] = client.post("/v1/captions", files=files(*[(f"{i}.jpg", RED) for i in range(5)]))
        first.join()
    assert max(fake.extract_sizes) <= 4 and sum(fake.extract_sizes) == 7
    assert sum(fake.decode_sizes) == 7
    assert [len(s["beams"]) for s in answers["beam2"].json()["images"]] == [2, 2]
    assert [s["caption"] for s in answers["many"].json()["images"]] == ["a red photo"] * 5


# --------------------------------------------------------------------------- MAX compatibility, metadata


def test_model_predict_answers_in_max_shape(client):
    answer = client.post("/model/predict", files=files(("red.jpg", RED)))
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ok",
        "predictions": [
            {"index": "0", "caption": "a red photo", "probability": pytest.approx(0.606531, abs=1e-6)},
            {"index": "1", "caption": "a red picture", "probability": pytest.approx(0.367879, abs=1e-6)},
            {"index": "2", "caption": "a red image", "probability": pytest.approx(0.135335, abs=1e-6)},
        ],
    }
    bad = client.post("/model/predict", files=files(("notes.jpg", b"hello")))
    assert bad.status_code == 400 and bad.json() == {"status": "error", "message": "notes.jpg: not an image Pillow can read"}
    tiff = client.post("/model/predict", files=files(("scan.tif", image_bytes(fmt="TIFF"))))
    assert tiff.status_code == 415
    two = client.post("/model/predict", files=files(("a.jpg", RED), ("b.jpg", RED)))
    assert two.status_code == 400 and "exactly one" in two.json()["message"]


def test_metadata_has_max_fields_and_the_served_bounds(client):
    meta = client.get("/model/metadata").json()
    for key in ("id", "name", "description", "license", "type", "source"):
        assert key in meta
    assert meta["id"] == "colour" and meta["vocab_size"] == 7
    assert meta["decode"] == {"beam_size": 3, "max_words": 30, "max_beam_size": 5, "max_max_words": 40}
    assert meta["limits"]["max_images"] == 16 and meta["limits"]["formats"] == ["JPEG", "PNG", "WEBP", "GIF", "BMP"]


def test_a_default_beam_over_the_served_bound_is_refused_at_start():
    config = Config()
    config.decode.beam_size = 8
    with pytest.raises(CaptionerError, match="decode.beam_size 8 is over serve.max_beam_size 5"):
        create_app(ColourModel, config)


# --------------------------------------------------------------------------- CORS, docs, the page


def test_cors_is_off_by_default_and_allows_only_the_configured_origin(fake):
    preflight = {"origin": "http://example.org", "access-control-request-method": "POST"}
    with client_for(create_app(lambda: fake)) as client:
        assert "access-control-allow-origin" not in client.options("/v1/captions", headers=preflight).headers
        assert "access-control-allow-origin" not in client.get("/health/live", headers={"origin": "http://example.org"}).headers
    with client_for(create_app(lambda: fake, config_with(cors_origin="http://example.org"))) as client:
        allowed = client.options("/v1/captions", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://example.org"
        other = client.options("/v1/captions", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_openapi_and_docs_work_offline(client):
    schema = client.get("/openapi.json").json()
    assert schema["info"]["summary"] == "Captions photos: merge and attention decoders over cached image features"
    assert "int8 MobileNetV2" in schema["info"]["description"] and "VGG16 fc2" in schema["info"]["description"]
    assert "merge LSTM)" not in schema["info"]["summary"]
    assert {"/v1/captions", "/model/predict", "/model/metadata", "/health/live", "/health/ready"} <= set(schema["paths"])
    body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["image"] == {"type": "array", "items": {"type": "string", "format": "binary"}}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text and "https://" not in docs.text.replace("https://fastapi.tiangolo.com", "")
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_the_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404
    for path in STATIC.iterdir():  # offline: nothing fetched from elsewhere; nothing shown as HTML
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, path.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, path.name


# --------------------------------------------------------------------------- a real tiny model directory


@pytest.fixture(scope="module")
def known_model_dir(tmp_path_factory) -> Path:
    """The hand-weighted model of tests/model_dirs.py: a red image is "a red circle", a blue one "a blue square"."""
    from model_dirs import make_known_model_dir

    return make_known_model_dir(tmp_path_factory.mktemp("known") / "m")


@pytest.fixture
def mean_pixel_net(monkeypatch):
    """VGG16 replaced by a global average pool (features: the mean preprocessed pixel); records its builds."""
    import keras

    from captioner.vision import backbones

    inputs = keras.Input((224, 224, 3))
    network = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    built = []
    monkeypatch.setattr(backbones, "build_backbone", lambda *args, **kwargs: built.append(args) or network)
    return built


def test_a_real_model_directory_gives_its_known_captions(known_model_dir, mean_pixel_net):
    decode = DecodeConfig(beam_size=2, max_generated_words=5)
    config = config_with(batch_window_ms=0)
    config.decode = decode
    red = image_bytes((255, 0, 0), size=(64, 48), fmt="PNG")  # lossless: the mean pixel is exact
    blue = image_bytes((0, 0, 255), size=(40, 30), fmt="PNG")
    with client_for(create_app(lambda: ModelCaptioner(known_model_dir, decode), config)) as client:
        wait_ready(client)
        slots = client.post(
            "/v1/captions", files=files(("red.png", red), ("broken.jpg", b"\xff\xd8garbage"), ("blue.png", blue))
        ).json()["images"]
        predicted = client.post("/model/predict?beam_size=1", files=files(("blue.png", blue))).json()
        meta = client.get("/model/metadata").json()
    assert len(mean_pixel_net) == 1  # the backbone is built once, at load
    assert [s["caption"] for s in slots] == ["a red circle", None, "a blue square"]
    assert slots[1]["error"]["status"] == 400
    for slot in (slots[0], slots[2]):
        assert slot["beams"][0] == {"caption": slot["caption"], "log_prob": slot["log_prob"], "probability": pytest.approx(math.exp(slot["log_prob"]))}
        assert len(slot["beams"]) == 2 and slot["beams"][1]["log_prob"] < slot["log_prob"] < 0
    assert predicted["status"] == "ok" and [p["caption"] for p in predicted["predictions"]] == ["a blue square"]
    assert meta["backbone"]["backbone"] == "vgg16" and meta["feature_dim"] == 3 and meta["vocab_size"] == 9
    assert meta["dev_metrics"] is None  # no eval-dev.json in the directory
    from captioner.cache import file_sha256

    assert meta["model_files"]["model.keras"] == file_sha256(known_model_dir / "model.keras")
    assert str(known_model_dir.parent) not in json.dumps(meta)  # names and hashes, never a path of the server


def test_serve_command_refuses_a_bad_model_directory_in_one_line(tmp_path, known_model_dir, capsys):
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'nowhere'} (pass --model DIR)"]
    assert main(["serve", "--model", str(known_model_dir), "--port", "70000"]) == 2
    assert "serve.port must be a TCP port" in capsys.readouterr().err
    import json
    import shutil

    imported = tmp_path / "imported"
    shutil.copytree(known_model_dir, imported)
    info = json.loads((imported / "config.json").read_text())
    info["features_provenance"] = {"backbone": None, "source": ["mobilenet.npz"]}
    (imported / "config.json").write_text(json.dumps(info))
    assert main(["serve", "--model", str(imported)]) == 2
    assert "trained on imported features (mobilenet.npz)" in capsys.readouterr().err


def test_serve_command_reports_a_port_in_use(known_model_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(known_model_dir), "--port", str(port)]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: " in capsys.readouterr().err


# --------------------------------------------------------------------------- one error shape, HEAD, multipart


def test_every_error_has_one_json_shape_including_404_405_and_422(client):
    shapes = {
        404: client.get("/no/such/path"),
        405: client.get("/v1/captions"),
        422: client.post("/v1/captions?beam_size=9", files=files(("red.jpg", RED))),
        415: client.post("/v1/captions", content=b"x", headers={"content-type": "text/plain"}),
    }
    for status, answer in shapes.items():
        body = answer.json()
        assert answer.status_code == status and set(body) == {"status", "message"} and body["status"] == "error", status
        assert "\n" not in body["message"] and body["message"], status
    assert shapes[404].json()["message"] == "/no/such/path: not found"
    assert shapes[405].json()["message"] == "GET is not allowed on /v1/captions (allowed: POST)"
    assert shapes[405].headers["allow"] == "POST"
    assert shapes[422].json()["message"] == "beam_size: Input should be less than or equal to 5"
    static_405 = client.post("/static/app.js")
    assert static_405.status_code == 405 and static_405.json()["status"] == "error"


def test_head_is_answered_wherever_get_is(client):
    for path in ("/", "/health/live", "/health/ready", "/v2/health/live", "/model/metadata", "/static/app.js",
                 "/openapi.json", "/docs"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/no/such/path").status_code == 404
    refused = client.head("/v1/captions")
    assert refused.status_code == 405 and refused.content == b""


def test_a_multipart_body_without_its_closing_boundary_is_refused(client, fake):
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="red.jpg"\r\n\r\n' + RED + b"\r\n"
    headers = {"content-type": "multipart/form-data; boundary=b"}
    for body in (part, part + b"--b\r\n", part[:-2]):
        answer = client.post("/v1/captions", content=body, headers=headers)
        assert answer.status_code == 400 and answer.json() == {
            "status": "error", "message": "malformed multipart body: it ends without its closing boundary"
        }
    assert fake.extract_sizes == []  # nothing of a cut-short request was captioned
    whole = client.post("/v1/captions", content=part + b"--b--\r\n", headers=headers)
    assert whole.status_code == 200 and whole.json()["images"][0]["caption"] == "a red photo"


def test_a_png_with_a_large_text_chunk_is_captioned(client):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 3_000_000, zip=True)  # 3 MB of text in a few kB: over Pillow's MAX_TEXT_CHUNK
    info.add_itxt("note", "y" * 2_000_000, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 200, 20)).save(buffer, format="PNG", pnginfo=info)
    assert len(buffer.getvalue()) < 20_000
    slots = client.post("/v1/captions", files=files(("notes.png", buffer.getvalue()))).json()["images"]
    assert slots[0]["error"] is None and slots[0]["caption"] == "a green photo"


# --------------------------------------------------------------------------- Host and Origin


def test_other_host_headers_are_refused_except_on_the_health_endpoints(fake):
    with TestClient(create_app(lambda: fake, config_with(batch_window_ms=0)), base_url="http://rebound.example") as client:
        for path in ("/", "/model/metadata", "/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 400 and refused.json() == {
                "status": "error",
                "message": "Host 'rebound.example' is not a name of this server (serve.allowed_hosts, --allowed-host: "
                           "127.0.0.1, localhost)",
            }, path
        assert client.post("/v1/captions", files=files(("red.jpg", RED))).status_code == 400
        assert client.get("/health/live").status_code == 200  # probes reach a server by its address
        assert fake.extract_sizes == []
    for base, allowed in (("http://127.0.0.1:8000", []), ("http://[::1]:8000", ["::1"]), ("http://photos.example.org", ["*.example.org"]),
                          ("http://anything", ["*"]), ("http://Captioner.Local.", ["captioner.local"])):
        with TestClient(create_app(lambda: fake, config_with(allowed_hosts=allowed)), base_url=base) as client:
            wait_ready(client)
            assert client.get("/model/metadata").status_code == 200, base
    with TestClient(create_app(lambda: fake, config_with(allowed_hosts=["photos.example.org"])), base_url="http://localhost") as client:
        assert client.get("/model/metadata").status_code == 400  # a given list replaces the defaults


def test_cross_origin_posts_are_refused_unless_cors_allows_the_origin(fake):
    def post(client, origin):
        return client.post("/v1/captions", files=files(("red.jpg", RED)), headers={"origin": origin})

    with client_for(create_app(lambda: fake, config_with(batch_window_ms=0))) as client:
        wait_ready(client)
        for origin in ("http://evil.example", "null", "http://localhost:9999", "http://localhost.evil.example"):
            refused = post(client, origin)
            assert refused.status_code == 403 and refused.json() == {
                "status": "error",
                "message": f"cross-origin request from {origin} refused (serve.cors_origin, --cors-origin, allows one origin)",
            }, origin
        assert fake.extract_sizes == []
        assert post(client, "http://localhost").status_code == 200  # the page's own origin
        assert client.post("/v1/captions", files=files(("red.jpg", RED))).status_code == 200  # no Origin: not a browser
        assert client.get("/model/metadata", headers={"origin": "http://evil.example"}).status_code == 200  # reads stay CORS's
    with TestClient(create_app(lambda: fake, config_with(batch_window_ms=0)), base_url="http://localhost:8000") as client:
        wait_ready(client)
        assert post(client, "http://localhost:8000").status_code == 200
        assert post(client, "http://localhost:8001").status_code == 403
    with client_for(create_app(lambda: fake, config_with(cors_origin="https://app.example", batch_window_ms=0))) as client:
        wait_ready(client)
        allowed = post(client, "https://app.example")
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert post(client, "https://other.example").status_code == 403


# --------------------------------------------------------------------------- budgets and cancellation


def gray16_png(size: tuple[int, int], value: int = 40_000) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode I;16), one value everywhere: a few kB for millions of pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_whose_decoding_needs_more_than_the_budget_gets_413_in_its_slot(fake):
    big = gray16_png((3000, 3000))  # 18 MB as I;16 pixels
    assert len(big) < 100_000
    with client_for(create_app(lambda: fake, config_with(decode_budget_mb=16, batch_window_ms=0))) as client:
        wait_ready(client)
        slots = client.post("/v1/captions", files=files(("huge.png", big), ("red.jpg", RED))).json()["images"]
        state = client.app.state.captioner
    assert slots[0]["error"]["status"] == 413
    assert slots[0]["error"]["message"].startswith("huge.png: decoding its 3000x3000 I;16 pixels needs ")
    assert slots[0]["error"]["message"].endswith("MB, over the 16 MB decode budget (serve.decode_budget_mb)")
    assert slots[1]["caption"] == "a red photo"
    assert state.pool.used == 0 and state.uploads.used == 0


def test_a_16_bit_png_is_scaled_to_8_bits_and_decodes_within_the_budget(fake):
    with client_for(create_app(lambda: fake, config_with(decode_budget_mb=64, batch_window_ms=0))) as client:
        wait_ready(client)
        slots = client.post("/v1/captions", files=files(("gray.png", gray16_png((2000, 1500), 65535)))).json()["images"]
        state = client.app.state.captioner
    assert slots[0]["error"] is None and slots[0]["caption"].startswith("a ")
    assert 0 < state.pool.peak <= 64 << 20 and state.pool.used == 0


def test_uploads_over_their_budget_get_503_at_once_and_their_bytes_are_given_back(fake):
    photo = image_bytes(size=(400, 300), fmt="PNG")
    assert len(photo) < 1 << 20
    with client_for(create_app(lambda: fake, config_with(upload_budget_mb=1, batch_window_ms=0))) as client:
        wait_ready(client)
        refused = client.post("/v1/captions", files=files(*[(f"{i}.bmp", image_bytes(size=(400, 300), fmt="BMP")) for i in range(4)]))
        state = client.app.state.captioner
        assert refused.status_code == 503 and refused.json()["message"] == (
            "the server holds 1 MB of uploads (serve.upload_budget_mb); retry later"
        )
        assert state.uploads.used == 0
        assert client.post("/v1/captions", files=files(("a.png", photo))).status_code == 200
        assert state.uploads.used == 0 and state.uploads.peak <= 1 << 20


def test_a_timed_out_request_stops_its_pending_decodes(fake, monkeypatch):
    from captioner.data import images

    decoded = []
    real_load = images.load_image

    def slow_load(handle, **kwargs):
        decoded.append(handle.name)
        time.sleep(0.3)
        return real_load(handle, **kwargs)

    monkeypatch.setattr(images, "load_image", slow_load)
    config = config_with(request_timeout_s=0.5, decode_threads=1, batch_window_ms=0)
    with client_for(create_app(lambda: fake, config)) as client:
        wait_ready(client)
        started = time.monotonic()
        answer = client.post("/v1/captions", files=files(*[(f"{i}.jpg", RED) for i in range(12)]))
        assert answer.status_code == 503 and time.monotonic() - started < 2.0
        time.sleep(1.0)
        state = client.app.state.captioner
        assert len(decoded) <= 3  # 12 queued; the one in progress at the timeout finishes, no more start
        assert state.pool.used == 0 and state.uploads.used == 0
        monkeypatch.setattr(images, "load_image", real_load)
        assert client.post("/v1/captions", files=files(("red.jpg", RED))).json()["images"][0]["caption"] == "a red photo"
    assert fake.extract_sizes in ([], [1], [1, 1])  # nothing of the timed-out request reached the backbone after it


# --------------------------------------------------------------------------- MAX order, metadata


class UnorderedModel(ColourModel):
    """Beams as a length-normalised beam search ranks them: the best first, but not the most probable."""

    def decode(self, image_features, beam_size, max_generated_words):
        beams = [Beam("a red photo of a ball on the grass", -1.2), Beam("a red photo", -0.7), Beam("red", -3.0)]
        return [beams[:beam_size] for _ in image_features]


def test_model_predict_lists_predictions_most_probable_first():
    with client_for(create_app(UnorderedModel, config_with(batch_window_ms=0))) as client:
        wait_ready(client)
        predictions = client.post("/model/predict", files=files(("red.jpg", RED))).json()["predictions"]
        slot = client.post("/v1/captions", files=files(("red.jpg", RED))).json()["images"][0]
    assert [p["index"] for p in predictions] == ["0", "1", "2"]
    assert [p["caption"] for p in predictions] == ["a red photo", "a red photo of a ball on the grass", "red"]
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert slot["caption"] == "a red photo of a ball on the grass"  # /v1/captions keeps the decoder's choice


def test_metadata_names_the_decoder_kind_and_no_path_of_the_server(monkeypatch):
    from types import SimpleNamespace

    from captioner import cache

    monkeypatch.setattr(cache, "file_sha256", lambda path: "cd" * 32)  # the model files are not here
    model = ModelCaptioner.__new__(ModelCaptioner)
    seen = {}
    for kind in ("attention", "merge"):
        model.captioner = SimpleNamespace(
            kind=kind, provenance={"backbone": "mobilenet_v2", "weights": "/home/someone/backbones/m.tflite",
                                   "weights_sha256": "ab" * 32},
            backbone=SimpleNamespace(name="mobilenet_v2"), model_dir=Path("/nonexistent/models/run7"), feature_dim=1280,
            tokenizer=SimpleNamespace(vocab_size=9), config=Config(),
        )
        seen[kind] = model.metadata()
    attention, merge = seen["attention"], seen["merge"]
    assert attention["name"] == "captioner mobilenet_v2 + soft-attention LSTM" and attention["decoder"] == "attention"
    assert "merge" not in attention["description"] and "Show, Attend and Tell" in attention["description"]
    assert merge["name"] == "captioner mobilenet_v2 + merge LSTM" and merge["decoder"] == "merge"
    assert attention["backbone"]["weights"] == "m.tflite" and attention["backbone"]["weights_sha256"] == "ab" * 32
    assert attention["model_files"] == {"model.keras": "cd" * 32, "tokenizer.json": "cd" * 32, "config.json": "cd" * 32}
    assert attention["training_data"]["features"] == [{"name": "vgg16-fc2.pkl", "sha256": None}]
    text = json.dumps(attention)
    assert "/home/someone" not in text and "/nonexistent" not in text and "data/features" not in text
