"""Config: defaults, dotted overrides, config files, and their one-line errors."""

import json

import pytest

from captioner import config as config_lib
from captioner.cli import main
from captioner.errors import ConfigError


def test_overrides_are_typed_against_the_defaults():
    config = config_lib.apply_overrides(
        config_lib.Config(),
        ["--train.epochs=20", "--train.learning_rate=3e-4", "--features.batch_size=64", "train.features=a.pkl,b.npz"],
    )
    assert config.train.epochs == 20 and isinstance(config.train.epochs, int)
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.features.batch_size == 64
    assert config.train.features == ["a.pkl", "b.npz"]


def test_later_override_wins():
    config = config_lib.apply_overrides(config_lib.Config(), ["--train.epochs=2", "--train.epochs=5"])
    assert config.train.epochs == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.epoch=3", "unknown config key 'train.epoch'"),
        ("--trian.epochs=3", "unknown config key 'trian.epochs'"),
        ("--train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("--train.learning_rate=fast", "train.learning_rate: expected a number"),
        ("--train.epochs", "bad override"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_lib.apply_overrides(config_lib.Config(), [override])


def test_round_trip_through_dict():
    config = config_lib.apply_overrides(config_lib.Config(), ["--model.units=128", "--decode.beam_size=5"])
    again = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(config))))
    assert again == config


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"epochs": 7, "batch_size": 16}}))
    config = config_lib.apply_overrides(config_lib.load_file(path), ["--train.epochs=9"])
    assert (config.train.epochs, config.train.batch_size) == (9, 16)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.load_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_lib.load_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"train": {"epochs": "many"}}))
    with pytest.raises(ConfigError, match="train.epochs"):
        config_lib.load_file(wrong)


def test_cli_reports_a_bad_override_in_one_line(capsys):
    code = main(["prepare", "--captions", "x.txt", "--text.min_word_cont=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "text.min_word_cont" in err and "Traceback" not in err


def test_cli_rejects_stray_arguments(capsys):
    assert main(["prepare", "--bogus"]) == 2
    assert "unrecognized argument: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.units=-5", "model.units must be at least 1, got -5"),
        ("--model.embedding_dim=0", "model.embedding_dim must be at least 1, got 0"),
        ("--model.image_dropout=1.5", "model.image_dropout must be in [0, 1), got 1.5"),
        ("--model.word_dropout=1", "model.word_dropout must be in [0, 1)"),
        ("--train.learning_rate=0", "train.learning_rate must be positive"),
        ("--train.learning_rate=nan", "train.learning_rate: expected a finite number"),
        ("--train.precision=float16", "train.precision must be one of float32, mixed_bfloat16, mixed_float16"),
        ("--features.precision=float16", "features.precision must be one of float32, mixed_bfloat16, mixed_float16, auto"),
        ("--features.resample=cubic", "features.resample must be one of nearest"),
        ("--decode.beam_size=0", "decode.beam_size must be at least 1"),
        ("--decode.length_normalization=-1", "decode.length_normalization must be at least 0"),
        ("--features.max_failed_fraction=2", "features.max_failed_fraction must be in [0, 1]"),
    ],
)
def test_ranges_are_checked_with_the_override(override, message):
    with pytest.raises(ConfigError, match=re_escape(message)):
        config_lib.apply_overrides(config_lib.Config(), [override])


def re_escape(text):
    import re

    return re.escape(text)


def test_every_default_is_within_its_range():
    config_lib.validate(config_lib.Config())


def test_ranges_are_checked_in_config_files_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"units": 0}}))
    with pytest.raises(ConfigError, match="model.units must be at least 1"):
        config_lib.load_file(path)
    path.write_text(json.dumps({"model": {"units": "many"}}))
    with pytest.raises(ConfigError, match="model.units: expected an integer, got 'many'"):
        config_lib.load_file(path)


def test_cross_field_rule():
    config = config_lib.Config()
    config.train.val_split = "train"
    with pytest.raises(ConfigError, match="train.train_split and train.val_split are both 'train'"):
        config_lib.validate(config)


def test_renamed_keys_still_load():
    config = config_lib.from_dict({"text": {"max_caption_length": 12}, "decode": {"max_caption_length": 7}})
    assert config.text.max_prepared_words == 12 and config.decode.max_generated_words == 7


@pytest.mark.parametrize("argv", [["train", "--model.units=-5"], ["train", "--model.image_dropout=1.5"]])
def test_cli_range_errors_are_one_line_before_any_work(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model.") and "Traceback" not in err


def test_one_precision_vocabulary_and_the_old_extraction_name_still_loads():
    assert set(config_lib.TRAIN_PRECISIONS) <= set(config_lib.FEATURE_PRECISIONS)
    config = config_lib.from_dict({"features": {"precision": "bfloat16"}})
    assert config.features.precision == "mixed_bfloat16"


def test_min_word_count_zero_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="text.min_word_count must be at least 1, got 0"):
        config_lib.apply_overrides(config_lib.Config(), ["--text.min_word_count=0"])


def test_batch_size_defaults_by_kind_and_the_learning_rate_scales_with_it(tmp_path):
    # Unset: merge 96 captions at 1.5e-3, attention 64 at 1e-3; validate writes the numbers down.
    merge = config_lib.validate(config_lib.Config())
    assert (merge.train.batch_size, merge.train.learning_rate) == (96, pytest.approx(1.5e-3))
    attention = config_lib.validate(config_lib.apply_overrides(config_lib.Config(), ["--model.kind=attention"]))
    assert (attention.train.batch_size, attention.train.learning_rate) == (64, pytest.approx(1e-3))
    # A set batch size without a learning rate gets 1e-3 per 64 captions; a set learning rate wins.
    cases = ((["--train.batch_size=128"], 128, 2e-3),
             (["--train.batch_size=32", "--model.kind=attention"], 32, 5e-4),
             (["--train.learning_rate=3e-4"], 96, 3e-4),
             (["--train.batch_size=128", "--train.learning_rate=1e-3"], 128, 1e-3))
    for overrides, batch, rate in cases:
        train = config_lib.validate(config_lib.apply_overrides(config_lib.Config(), overrides)).train
        assert (train.batch_size, train.learning_rate) == (batch, pytest.approx(rate)), overrides
    # A model directory's saved config keeps what it was trained with (64 at 1e-3 before this default).
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"train": {"batch_size": 64, "learning_rate": 1e-3}}))
    old = config_lib.validate(config_lib.load_file(path))
    assert (old.train.batch_size, old.train.learning_rate) == (64, pytest.approx(1e-3))
    assert config_lib.from_dict(config_lib.to_dict(merge)).train.batch_size == 96
    # The stage's params (what caching and resume compare) hold the numbers, set or not.
    from captioner.stages.training import stage_params

    params = stage_params(config_lib.Config())
    assert (params["train.batch_size"], params["train.learning_rate"]) == (96, pytest.approx(1.5e-3))
    with pytest.raises(ConfigError, match="train.batch_size must be at least 1"):
        config_lib.apply_overrides(config_lib.Config(), ["--train.batch_size=0"])


def test_decoder_dropout_defaults_by_kind_and_a_set_value_wins(tmp_path):
    # Unset, it follows model.kind whichever order the overrides come in; validate writes it down.
    merge = config_lib.validate(config_lib.Config())
    assert merge.model.decoder_dropout == 0.0
    attention = config_lib.apply_overrides(config_lib.Config(), ["--model.kind=attention"])
    assert attention.model.decoder_dropout is None and config_lib.decoder_dropout(attention.model) == 0.5
    assert config_lib.validate(attention).model.decoder_dropout == 0.5
    for overrides, rate in ((["--model.decoder_dropout=0.2", "--model.kind=attention"], 0.2),
                            (["--model.kind=attention", "--model.decoder_dropout=0"], 0.0)):
        assert config_lib.validate(config_lib.apply_overrides(config_lib.Config(), overrides)).model.decoder_dropout == rate
    # "default" (command line) and null (config file) unset a value again.
    config = config_lib.apply_overrides(config_lib.Config(), ["--model.decoder_dropout=0.2", "--model.decoder_dropout=default"])
    assert config.model.decoder_dropout is None
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"kind": "attention", "decoder_dropout": None}}))
    saved = config_lib.validate(config_lib.load_file(path))
    assert saved.model.decoder_dropout == 0.5
    # A saved, validated config round-trips with the number, so a model never depends on today's defaults.
    assert config_lib.from_dict(config_lib.to_dict(saved)).model.decoder_dropout == 0.5
    with pytest.raises(ConfigError, match="model.decoder_dropout"):
        config_lib.apply_overrides(config_lib.Config(), ["--model.decoder_dropout=1.5"])
    with pytest.raises(ConfigError, match="model.decoder_dropout: expected a number"):
        config_lib.apply_overrides(config_lib.Config(), ["--model.decoder_dropout=half"])
    unknown_kind = config_lib.Config()
    unknown_kind.model.kind = "lstm"  # a Config built in code: validate names the kind, not a KeyError
    with pytest.raises(ConfigError, match="model.kind must be one of"):
        config_lib.validate(unknown_kind)
