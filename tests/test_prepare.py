"""The captions stage: token/split/Karpathy parsing, bad input, caching, write failures, the CLI, real Flickr8k.

The cleaning rule itself is tested in test_cleaning.py.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from captioner import cache, cli
from captioner.config import Config
from captioner.data import captions as captions_lib
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError
from captioner.stages import prepare

# --------------------------------------------------------------------------- helpers

TOKEN_LINES = [
    "img1.jpg#0\tA dog runs on a beach .",
    "img1.jpg#1\tA brown dog is running .",
    "img2.jpg#0\tTwo kids in t-shirts play .",
    "img2.jpg#1\tA girl , in a red coat , smiles !",
    "img3.jpg#0\tA man rides a bike .",
    "img4.jpg#0\tA woman walks a dog .",
    "img4.jpg.1#0\tThe quirk key has no image .",
    "img9.jpg#0\tAn image in no split .",
]


def write_flickr(folder: Path, lines=TOKEN_LINES, train=("img1.jpg", "img2.jpg"), dev=("img3.jpg",),
                 test=("img4.jpg", "img5.jpg")) -> Path:
    """A tiny Flickr8k layout; img5 is in the test split but has no caption."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "Flickr8k.token.txt"
    if isinstance(lines, bytes):
        token.write_bytes(lines)
    else:
        token.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, images in (("train", train), ("dev", dev), ("test", test)):
        (folder / f"Flickr_8k.{name}Images.txt").write_text("".join(f"{i}\n" for i in images))
    return token


def make_config(captions: Path, splits: Path, output: Path, **text) -> Config:
    config = Config()
    config.text.captions, config.text.splits, config.text.output = str(captions), str(splits), str(output)
    for key, value in text.items():
        setattr(config.text, key, value)
    return config


# --------------------------------------------------------------------------- parsing


def test_token_file_bad_lines_reported_by_number_and_skipped(tmp_path):
    lines = (
        b"img1.jpg#0\tA dog runs .\n"
        b"img1.jpg#1 no tab here\n"  # line 2
        b"img1.jpg\tno caption number\n"  # line 3
        b"img1.jpg#x\tnot a number\n"  # line 4
        b"img1.jpg#2\t   \n"  # line 5
        b"img1.jpg#3\tbad \xff\xfe bytes\n"  # line 6
        b"\n"  # blank: ignored
        b"img1.jpg#4\t2 3 .\n"  # line 8: nothing left after cleaning
        b"img2.jpg#0\tA cat .\r\n"  # line 9, Windows line ending
    )
    path = tmp_path / "tokens.txt"
    path.write_bytes(lines)
    captions, bad, unusable, _ = captions_lib.read_token_file(path)
    assert captions == {"img1": ["a dog runs"], "img2": ["a cat"]}
    assert [(item["line"], item["reason"]) for item in bad] == [
        (2, "no tab between key and caption"),
        (3, "key is not IMAGE#N"),
        (4, "key is not IMAGE#N"),
        (5, "empty caption"),
        (6, "not UTF-8 (byte 15)"),
        (8, "no words left after cleaning"),
    ]
    assert "\\xff" in bad[4]["text"]
    assert unusable == []


def test_quirk_key_reported_not_crashing(tmp_path):
    token = write_flickr(tmp_path)
    captions, bad, unusable, _ = captions_lib.read_token_file(token)
    assert bad == []
    assert unusable == [{"key": "img4.jpg.1", "reason": "not an image file name", "captions": 1, "line": 7}]
    assert "img4" in captions and len(captions["img4"]) == 1


def test_two_keys_with_one_image_id_are_reported_not_merged(tmp_path, caplog):
    lines = [
        "a/x.jpg#0\tA dog runs .",
        "b/x.jpg#0\tA cat sleeps .",  # line 2: the same id "x" from another folder
        "a/x.jpg#1\tA brown dog .",
        "x.png#0\tA bird flies .",  # line 4: the same id again, another suffix
        "b/x.jpg#1\tA grey cat .",
        "y.jpg#0\tA man walks .",
    ]
    token = write_flickr(tmp_path / "data", lines=lines, train=("x.jpg",), dev=("y.jpg",), test=())
    captions, bad, unusable, _ = captions_lib.read_token_file(token)
    assert captions == {"x": ["a dog runs", "a brown dog"], "y": ["a man walks"]}  # only a/x.jpg's captions
    assert bad == []
    assert unusable == [
        {"key": "b/x.jpg", "reason": "same image id as 'a/x.jpg'", "captions": 2, "line": 2},
        {"key": "x.png", "reason": "same image id as 'a/x.jpg'", "captions": 1, "line": 4},
    ]

    out = tmp_path / "caps"
    with caplog.at_level(logging.WARNING, logger="captioner.stages.prepare"):
        result = prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1))
    assert "2 keys name an image id an earlier key has" in caplog.text
    assert "'b/x.jpg'" in caplog.text and "'x.png'" in caplog.text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["duplicate_image_ids"] == 2
    assert [item["key"] for item in stats["unusable_keys"]] == ["b/x.jpg", "x.png"]
    assert json.loads((out / "train.json").read_text()) == {"x": ["a dog runs", "a brown dog"]}
    assert (result.duplicate_image_ids, result.unusable_keys) == (2, 2)
    assert "2 unusable keys (2 of them a duplicate image id)" in result.summary()


def test_token_file_keys_may_have_any_image_suffix(tmp_path):
    token = tmp_path / "tokens.txt"
    token.write_text("a.JPG#0\tA dog .\nb.webp#0\tA cat .\nc.bmp#0\tA cow .\nd.txt#0\tA note .\n")
    captions, _, unusable, _ = captions_lib.read_token_file(token)
    assert captions == {"a": ["a dog"], "b": ["a cat"], "c": ["a cow"]}
    assert [(item["key"], item["reason"]) for item in unusable] == [("d.txt", "not an image file name")]


def test_read_flickr8k_splits(tmp_path):
    data = captions_lib.read_captions(write_flickr(tmp_path), tmp_path)
    assert data.source_format == "flickr8k"
    assert data.splits["train"] == {
        "img1": ["a dog runs on a beach", "a brown dog is running"],
        "img2": ["two kids in t shirts play", "a girl in a red coat smiles"],
    }
    assert list(data.splits["dev"]) == ["img3"]
    assert data.listed == {"train": 2, "dev": 1, "test": 2}
    assert data.without_captions == {"train": [], "dev": [], "test": ["img5"]}
    assert data.unsplit_images == 1  # img9


def test_overlapping_splits_are_an_error(tmp_path):
    token = write_flickr(tmp_path, dev=("img3.jpg", "img1.jpg"))
    with pytest.raises(CaptionerError, match="img1"):
        captions_lib.read_captions(token, tmp_path)


def test_karpathy_json_maps_val_to_dev_and_restval_to_train(tmp_path):
    def image(name, split, *sentences, raw=False):
        return {
            "filename": name,
            "split": split,
            "sentences": [{"raw": s} if raw else {"tokens": s.split(), "raw": s} for s in sentences],
        }

    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": [
        image("a.jpg", "train", "a dog runs", "a brown dog"),
        image("b.jpg", "restval", "two cats"),
        image("c.jpg", "val", "a man rides a bike"),
        image("d.jpg", "test", "A Woman, walking!", raw=True),
        image("e.jpg", "test"),  # no sentences
        image("f.jpg", "other", "x"),
        image("sub/c.jpg", "test", "a cat"),  # the id "c" again: reported, not merged
    ]}))
    data = captions_lib.read_captions(path, tmp_path / "ignored")
    assert data.source_format == "karpathy"
    assert data.splits == {
        "train": {"a": ["a dog runs", "a brown dog"], "b": ["two cats"]},
        "dev": {"c": ["a man rides a bike"]},
        "test": {"d": ["a woman walking"]},
    }
    assert data.without_captions["test"] == ["e"]
    assert [(item["key"], item["reason"]) for item in data.unusable_keys] == [
        ("f.jpg", "unknown split 'other'"), ("sub/c.jpg", "same image id as 'c.jpg' (dev)")
    ]
    assert [item["key"] for item in data.duplicate_keys()] == ["sub/c.jpg"]


@pytest.mark.parametrize("content", ["not json", "[]", '{"images": 3}', '{"images": [{"filename": "a.jpg"}]}'])
def test_not_a_karpathy_json(tmp_path, content):
    path = tmp_path / "dataset_coco.json"
    path.write_text(content)
    with pytest.raises(CaptionerError, match="Karpathy") as info:
        captions_lib.read_captions(path, tmp_path)
    assert str(path) in str(info.value)


def test_missing_inputs_name_the_path(tmp_path):
    token = write_flickr(tmp_path / "data")
    with pytest.raises(CaptionerError, match="captions file not found.*nope.txt"):
        prepare.prepare_stage(make_config(tmp_path / "nope.txt", tmp_path / "data", tmp_path / "out"))
    with pytest.raises(CaptionerError, match="split folder not found.*nofolder"):
        prepare.prepare_stage(make_config(token, tmp_path / "nofolder", tmp_path / "out"))
    (tmp_path / "data" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(CaptionerError, match="split file not found.*Flickr_8k.devImages.txt"):
        prepare.prepare_stage(make_config(token, tmp_path / "data", tmp_path / "out"))


def test_length_percentiles():
    assert prepare.length_percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
    assert prepare.length_percentiles([7]) == {"p50": 7, "p90": 7, "p95": 7, "p99": 7, "max": 7}


# --------------------------------------------------------------------------- the stage


def test_prepare_stage_writes_outputs_then_is_up_to_date(tmp_path, caplog):
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "caps"
    config = make_config(token, tmp_path / "data", out, min_word_count=2, max_prepared_words=5)
    with caplog.at_level(logging.WARNING, logger="captioner.stages.prepare"):
        result = prepare.prepare_stage(config)
    assert not result.up_to_date
    assert "img4.jpg.1" in caplog.text and "img5" in caplog.text

    train = json.loads((out / "train.json").read_text())
    assert train == {
        "img1": ["a dog runs on a", "a brown dog is running"],  # cut to 5 words
        "img2": ["two kids in t shirts", "a girl in a red"],
    }
    assert json.loads((out / "test.json").read_text()) == {"img4": ["a woman walks a dog"]}
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    assert tokenizer.words[4:] == ["a", "dog", "in"]  # train only, count >= 2; "woman" (test) is unknown
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["truncated_captions"] == 3
    assert stats["splits"]["train"]["length_percentiles"]["max"] == 7  # measured before truncation
    assert stats["splits"]["test"]["images_without_captions_ids"] == ["img5"]
    assert stats["unusable_keys"][0]["key"] == "img4.jpg.1"
    assert stats["vocabulary"]["vocab_size"] == tokenizer.vocab_size == 7
    assert (out / "manifest.json").is_file()

    assert result.images == {"train": 2, "dev": 1, "test": 1}
    assert result.captions == {"train": 4, "dev": 1, "test": 1}
    assert (result.unusable_keys, result.images_without_captions, result.truncated) == (1, 1, 3)
    summary = result.summary()
    assert "train: 2 images, 4 captions" in summary and "1 unusable keys (0 of them" in summary

    before = (out / "train.json").stat().st_mtime_ns
    again = prepare.prepare_stage(config)
    assert again.up_to_date
    assert again.captions == result.captions and again.vocab_size == result.vocab_size
    assert (out / "train.json").stat().st_mtime_ns == before

    config.text.min_word_count = 1
    rerun = prepare.prepare_stage(config)
    assert not rerun.up_to_date and rerun.vocab_size > result.vocab_size
    assert prepare.prepare_stage(config, force=True).up_to_date is False


def test_prepare_stage_reruns_when_a_split_file_changes(tmp_path):
    token = write_flickr(tmp_path / "data")
    config = make_config(token, tmp_path / "data", tmp_path / "caps", min_word_count=1)
    prepare.prepare_stage(config)
    (tmp_path / "data" / "Flickr_8k.devImages.txt").write_text("img3.jpg\nimg9.jpg\n")
    result = prepare.prepare_stage(config)
    assert not result.up_to_date and result.images["dev"] == 2


def test_prepare_stage_with_karpathy_json(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "val", "sentences": [{"tokens": ["a", "cat"]}]},
    ]}))
    out = tmp_path / "caps"
    result = prepare.prepare_stage(make_config(path, tmp_path / "no-splits-needed", out, min_word_count=1))
    assert result.images == {"train": 1, "dev": 1, "test": 0}
    assert json.loads((out / "dev.json").read_text()) == {"b": ["a cat"]}


def test_prepare_stage_refuses_empty_train(tmp_path):
    token = write_flickr(tmp_path / "data", train=("nothere.jpg",))
    with pytest.raises(CaptionerError, match="train split has no captions"):
        prepare.prepare_stage(make_config(token, tmp_path / "data", tmp_path / "caps"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_prepare_holds_the_output_lock(tmp_path):
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "caps"
    with cache.output_lock(out):
        with pytest.raises(CaptionerError, match="being written by another run"):
            prepare.prepare_stage(make_config(token, tmp_path / "data", out))
    assert not (out / "train.json").exists()
    assert prepare.prepare_stage(make_config(token, tmp_path / "data", out)).images["train"] == 2


def test_full_disk_is_one_line_and_keeps_the_previous_captions(tmp_path, capsys, disk_full):
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "caps"
    args = ["prepare", "--captions", str(token), "--splits", str(tmp_path / "data"), "--output", str(out)]
    assert cli.main([*args, "--text.min_word_count=1"]) == 0
    before = folder_bytes(out)
    assert set(before) >= {"train.json", "dev.json", "test.json", "tokenizer.json", "stats.json", "manifest.json"}
    capsys.readouterr()

    disk_full(out / "stats.json")  # the last of the five: the four before it were written in full
    assert cli.main([*args, "--text.min_word_count=2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the others: logged warnings
    assert len(errors) == 1 and "Traceback" not in err
    assert f"cannot write {out / 'stats.json'}" in errors[0] and "No space left on device" in errors[0]
    assert folder_bytes(out) == before  # byte-identical, nothing half-written, no temporary left
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []

    assert cli.main([*args, "--text.min_word_count=2"]) == 0  # the rerun works
    assert Tokenizer.load(out / "tokenizer.json").words[4:] == ["a", "dog", "in"]


def test_file_size_limit_keeps_the_previous_captions(tmp_path, file_size_limit):
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "caps"
    prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1))
    before = folder_bytes(out)
    assert max(len(data) for data in before.values()) > 300  # stats.json does not fit under the limit
    # captions cut to 3 words: the small split files change and fit, stats.json does not
    with file_size_limit(300), pytest.raises(cache.WriteError) as info:
        prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1, max_prepared_words=3))
    message = str(info.value)
    assert "\n" not in message and f"cannot write {out}" in message and "file-size limit" in message
    assert folder_bytes(out) == before
    rerun = prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1, max_prepared_words=3))
    assert not rerun.up_to_date and rerun.truncated == 6  # all six split captions have more than 3 words


def test_permission_denied_names_the_file(tmp_path, monkeypatch):
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "caps"
    prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1))
    before = folder_bytes(out)

    real_open = open

    def refuse_tokenizer(file, *args, **kwargs):  # we run as root, where chmod stops nothing
        if "tokenizer.json" in str(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(cache, "open", refuse_tokenizer, raising=False)
    # shorter captions: every split file changes, and tokenizer.json comes after them
    with pytest.raises(CaptionerError, match=r"cannot write .*tokenizer\.json: Permission denied"):
        prepare.prepare_stage(make_config(token, tmp_path / "data", out, min_word_count=1, max_prepared_words=3))
    assert folder_bytes(out) == before


def test_cli_prepare_missing_token_file_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.token.txt"
    code = cli.main(["prepare", "--captions", str(missing), "--splits", str(tmp_path), "--output",
                     str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().count("\n") == 0
    assert str(missing) in captured.err and captured.err.startswith("error:")
    assert "Traceback" not in captured.err


def test_cli_prepare_prints_summary(tmp_path, capsys):
    token = write_flickr(tmp_path / "data")
    code = cli.main(["prepare", "--captions", str(token), "--splits", str(tmp_path / "data"), "--output",
                     str(tmp_path / "out"), "--text.min_word_count=1"])
    assert code == 0
    assert "train: 2 images, 4 captions" in capsys.readouterr().out


# --------------------------------------------------------------------------- real Flickr8k


def test_real_flickr8k(shared_flickr8k, tmp_path):
    config = make_config(shared_flickr8k / "Flickr8k.token.txt", shared_flickr8k, tmp_path / "caps")
    result = prepare.prepare_stage(config)
    assert result.images == {"train": 6000, "dev": 1000, "test": 1000}
    assert result.captions == {"train": 30000, "dev": 5000, "test": 5000}
    assert result.bad_lines == 0 and result.images_without_captions == 0
    stats = json.loads((tmp_path / "caps" / "stats.json").read_text())
    assert [(k["key"], k["captions"], k["line"]) for k in stats["unusable_keys"]] == [
        ("2258277193_586949ec62.jpg.1", 5, 6731)
    ]
    assert stats["captioned_images_in_no_split"] == 91
    tokenizer = Tokenizer.load(tmp_path / "caps" / "tokenizer.json")
    assert tokenizer.words[4] == "a"  # the most common word survives cleaning
    assert 2000 < tokenizer.vocab_size < 3500
    assert stats["vocabulary"]["token_coverage"] > 0.97


# --------------------------------------------------------------------------- what prepare writes over (issue 26)


def test_prepare_writes_only_into_a_folder_of_its_own(tmp_path, capsys):
    """Issue 26: prepare replaced a user's train.json and tokenizer.json beside their notes.txt."""
    token = write_flickr(tmp_path / "data")
    out = tmp_path / "mine"
    out.mkdir()
    users = {"train.json": b'{"mine": ["my own captions"]}', "tokenizer.json": b"{}", "notes.txt": b"my notes"}
    for name, data in users.items():
        (out / name).write_bytes(data)
    argv = ["prepare", "--captions", str(token), "--splits", str(tmp_path / "data"), "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out} is not empty and holds no prepared captions (notes.txt, tokenizer.json, train.json): "
                   "choose another --output, or --force writes into it"]
    assert folder_bytes(out) == users  # untouched, and no lock file left

    assert cli.main([*argv, "--force"]) == 0  # --force writes into it
    assert (out / "notes.txt").read_bytes() == b"my notes" and json.loads((out / "train.json").read_text())["img1"]
    capsys.readouterr()
    assert cli.main(argv) == 0 and "(up to date)" in capsys.readouterr().out  # its own now: cached as ever
    assert cli.main([*argv, "--text.min_word_count=2"]) == 0  # changed params: rewritten
    assert "up to date" not in capsys.readouterr().out


def test_prepare_refuses_another_stages_folder_and_leaves_no_empty_folder(tmp_path, capsys):
    from captioner.config import DemoConfig
    from captioner.data import demo

    token = write_flickr(tmp_path / "data")
    demo_folder = tmp_path / "demo"
    demo.make_demo_data(DemoConfig(output=str(demo_folder), images=10, seed=0))
    before = folder_bytes(demo_folder)
    with pytest.raises(CaptionerError, match="holds the output of captioner demo-data, not of captioner prepare"):
        prepare.prepare_stage(make_config(token, tmp_path / "data", demo_folder))
    assert folder_bytes(demo_folder) == before

    fresh = tmp_path / "new" / "captions"
    with pytest.raises(CaptionerError, match="no usable captions"):
        prepare.prepare_stage(make_config(write_flickr(tmp_path / "other", train=("x.jpg",), dev=(), test=()),
                                           tmp_path / "other", fresh))
    assert not (tmp_path / "new").exists()  # a refused run leaves no folder (and no lock) behind


@pytest.mark.parametrize("where", ["output", "captions", "splits"])
def test_a_file_name_too_long_is_one_line(tmp_path, capsys, where):
    token = write_flickr(tmp_path / "data")
    paths = {"captions": token, "splits": tmp_path / "data", "output": tmp_path / "caps"}
    paths[where] = tmp_path / ("a" * 300)
    code = cli.main(["prepare", "--captions", str(paths["captions"]), "--splits", str(paths["splits"]),
                     "--output", str(paths["output"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "too long" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
