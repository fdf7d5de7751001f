"""captioner.data.sources (folders, WebDataset shards, parquet -> blocks of (id, bytes)) and the
WebDataset caption reader `captioner prepare` uses. Fast: no Ray, no network."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.config import Config
from captioner.data import sources
from captioner.data.captions import read_captions
from captioner.data.demo import make_demo_data, write_demo_shards
from captioner.errors import CaptionerError
from captioner.stages.prepare import prepare_stage


def jpeg(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pa = pytest.importorskip("pyarrow")  # the test extra has it; without it parquet tests skip
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=3)
    return path


def test_shards_are_planned_in_blocks_and_read_at_their_offsets(tmp_path):
    shards = write_demo_shards(tmp_path / "shards", 25, per_shard=10)
    plan = sources.plan_sources(str(tmp_path / "shards" / "*.tar"), block_size=4)
    assert plan.kind == "webdataset" and plan.sources == shards and plan.images == 25
    assert [b.name for b in plan.blocks][:4] == ["00000-00000-00000", "00000-00000-00001", "00000-00000-00002",
                                                   "00001-00001-00000"]
    assert [len(b.items) for b in plan.blocks] == [4, 4, 2, 4, 4, 2, 4, 1]
    first = plan.blocks[0].items[0]
    assert first.image_id == "shapes_00000" and first.name == "00000.tar:shapes_00000.jpg"
    read = list(sources.read_block(plan.blocks[0]))
    with tarfile.open(shards[0]) as tar:
        assert read[0][1] == tar.extractfile("shapes_00000.jpg").read()
    assert all(error is None for _, _, error in read)
    # The same inputs named as a folder of shards, or one by one, give the same plan.
    assert sources.plan_sources(str(tmp_path / "shards"), 4).blocks == plan.blocks
    joined = sources.plan_sources([str(p) for p in shards], 4)
    assert joined.blocks == plan.blocks and joined.digest == plan.digest
    # A block survives its JSON form (what a Ray task receives).
    assert sources.Block.from_json(plan.blocks[3].to_json()) == plan.blocks[3]


def test_a_missing_image_a_bad_image_and_repeated_keys_are_named_not_lost_or_doubled(tmp_path):
    write_shard(tmp_path / "a.tar", {"k1.jpg": jpeg(), "k1.txt": b"a red thing", "k2.txt": b"no image here",
                                     "k3.jpg": b"not a jpeg at all", "dir/k4.png": jpeg((0, 0, 200))})
    write_shard(tmp_path / "b.tar", {"k1.jpg": jpeg((0, 200, 0)), "k5.jpg": jpeg()})
    plan = sources.plan_sources([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], block_size=10)
    ids = [item.image_id for block in plan.blocks for item in block.items]
    assert ids == ["k1", "k2", "k3", "k4", "k5"]  # k1 once: the first shard's
    assert plan.duplicates == {"b.tar:k1.jpg": "duplicate id 'k1': kept a.tar:k1.jpg"}
    read = {item.image_id: (data, error) for block in plan.blocks for item, data, error in sources.read_block(block)}
    assert read["k2"] == (None, "no image in the sample (only its other files)")
    assert read["k3"] == (b"not a jpeg at all", None)  # bytes: the decoder says why it is no image
    assert read["k4"][0] == jpeg((0, 0, 200))


def test_tars_that_are_not_shards_and_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"this is no tar file" * 100)
    write_shard(tmp_path / "docs.tar", {"readme.md": b"hello", "notes.txt": b"x"})
    empty = write_shard(tmp_path / "empty" / "0.tar", {})
    (tmp_path / "notes.csv").write_text("a,b\n")
    write_shard(tmp_path / "mixed" / "s.tar", {"k.jpg": jpeg()})
    write_parquet(tmp_path / "mixed" / "p.parquet", {"image": [jpeg()]})
    cases = {
        str(tmp_path / "fake.tar"): "not a WebDataset shard (not an uncompressed tar file",
        str(tmp_path / "docs.tar"): "not a WebDataset shard (no KEY.",
        str(empty): "the tar is empty",
        str(tmp_path / "nothing-*.tar"): "no files match",
        str(tmp_path / "absent"): "input not found",
        str(tmp_path / "notes.csv"): "not an input this reads",
        str(tmp_path / "mixed"): "inputs of different kinds",
    }
    for given, message in cases.items():
        with pytest.raises(CaptionerError) as caught:
            sources.plan_sources(given)
        assert message in str(caught.value) and "\n" not in str(caught.value), (given, caught.value)


def test_parquet_rows_are_images_with_ids_and_named_columns(tmp_path):
    images = [jpeg((i * 30, 0, 0)) for i in range(7)]
    path = write_parquet(tmp_path / "p.parquet", {"id": [f"img{i}" for i in range(7)], "image": images,
                                                  "caption": ["x"] * 7})
    plan = sources.plan_sources(str(path), block_size=4)
    assert plan.kind == "parquet" and [len(b.items) for b in plan.blocks] == [4, 3]
    read = [(item.image_id, data) for block in plan.blocks for item, data, _ in sources.read_block(block)]
    assert read == [(f"img{i}", images[i]) for i in range(7)]  # across row groups of 3

    # Hugging Face datasets' Image feature (a struct with bytes), another column name, no id column.
    hf = write_parquet(tmp_path / "hf" / "train.parquet", {"jpg": [{"bytes": images[0], "path": "a.jpg"},
                                                                   {"bytes": None, "path": "b.jpg"}]})
    plan = sources.plan_sources(str(hf), image_column="jpg")
    read = [(item.image_id, item.name, data, error) for item, data, error in sources.read_block(plan.blocks[0], "jpg")]
    assert read[0] == ("train-000000", "train.parquet:row 0", images[0], None)
    assert read[1][2] is None and "null" in read[1][3]

    with pytest.raises(CaptionerError, match=r"no image column 'image' \(engine.image_column / --image-column; "
                                             r"its columns: jpg\)"):
        sources.plan_sources(str(hf))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nothing")
    with pytest.raises(CaptionerError, match="not a readable parquet file"):
        sources.plan_sources(str(tmp_path / "junk.parquet"))


def test_a_folder_is_read_as_extract_always_read_it(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "b.jpg").write_bytes(jpeg())
    (folder / "a.png").write_bytes(jpeg())
    (folder / "a.jpg").write_bytes(jpeg())
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    plan = sources.plan_sources(str(folder), block_size=2)
    assert [i.name for b in plan.blocks for i in b.items] == ["a.jpg", "b.jpg", "gone.jpg"]
    assert plan.duplicates == {"a.png": "duplicate id 'a': kept a.jpg"}
    errors = {item.name: error for b in plan.blocks for item, _, error in sources.read_block(b)}
    assert errors["gone.jpg"].startswith("broken symbolic link")
    assert sources.is_image_folder(str(folder)) and not sources.is_image_folder(str(tmp_path / "x" / "*.tar"))


def test_prepare_reads_captions_from_shards_as_from_the_token_file(tmp_path):
    """The demo set as shards and as Flickr8k files: the same prepared captions and tokenizer."""
    config = Config()
    config.demo.output, config.demo.images = str(tmp_path / "demo"), 40
    make_demo_data(config.demo)
    shards = write_demo_shards(tmp_path / "shards", 40, per_shard=15)

    config.text.captions = str(tmp_path / "demo" / "Flickr8k.token.txt")
    config.text.splits, config.text.output = str(tmp_path / "demo"), str(tmp_path / "from-token")
    prepare_stage(config)
    # With the split files: the same splits; without them: each sample's JSON "split" (the same here).
    for splits, output in ((str(tmp_path / "demo"), "from-shards"), (str(tmp_path / "none"), "from-json")):
        assert main(["prepare", "--captions", *map(str, shards), "--splits", splits,
                     "--output", str(tmp_path / output)]) == 0
        for name in ("train.json", "dev.json", "test.json", "tokenizer.json"):
            assert (tmp_path / output / name).read_text() == (tmp_path / "from-token" / name).read_text(), name
    assert main(["prepare", "--captions", *map(str, shards), "--splits", str(tmp_path / "demo"),
                 "--output", str(tmp_path / "from-shards")]) == 0  # cached: up to date


def test_shard_captions_from_txt_and_json_with_bad_samples_and_repeated_keys(tmp_path):
    write_shard(tmp_path / "s" / "0.tar", {
        "a.jpg": jpeg(), "a.txt": b"A dog runs.\nA dog is running\n", "a.json": json.dumps({"caption": "A dog runs."}).encode(),
        "b.jpg": jpeg(), "b.json": json.dumps({"captions": ["two cats", "cats"]}).encode(),
        "c.jpg": jpeg(), "c.json": b"{not json",
        "d.jpg": jpeg(), "d.txt": b"\xff\xfe bad bytes",
        "e.txt": b"a caption without an image",
    })
    write_shard(tmp_path / "s" / "1.tar", {"a.jpg": jpeg(), "a.txt": b"another dog"})
    data = read_captions(str(tmp_path / "s"), tmp_path / "no-splits")
    captions = {key: texts for split in data.splits.values() for key, texts in split.items()}
    assert captions["a"] == ["a dog runs", "a dog is running"] and captions["b"] == ["two cats", "cats"]
    assert "e" not in captions and "c" not in captions and "d" not in captions
    reasons = {item["line"]: item["reason"] for item in data.bad_lines}
    assert reasons["0.tar:c.json"].startswith("not JSON") and reasons["0.tar:d.txt"].startswith("not UTF-8")
    assert [item["key"] for item in data.duplicate_keys()] == ["1.tar:a"]
