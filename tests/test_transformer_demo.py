"""The transformer through every stage on the demo data, with a tiny model: `extract` of a Keras
backbone's map (EfficientNetB0's top activation, random weights: a random MobileNetV2's out_relu is all zeros, which extract refuses), `prepare`, `train --model.kind=transformer`
(1 epoch), the model directory's step model against the full model, save/load, beam search and
ensembles, `evaluate`, `finetune` (SCST, 1 epoch), `caption --explain`, and the one-line refusals
(pooled vectors for a map model, a resume of a run of another kind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from captioner.config import Config, DemoConfig, ModelConfig  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402

TINY = ModelConfig(kind="transformer", units=16, heads=2, layers=1, feedforward_dim=32)


def demo_config(root: Path, images: int = 12) -> Config:
    """Demo data, its captions prepared; the config's features section set for a Keras map extraction."""
    from captioner.data.demo import make_demo_data
    from captioner.stages.prepare import prepare_stage

    demo = root / "demo"
    make_demo_data(DemoConfig(output=str(demo), images=images, seed=0))
    config = Config()
    config.features.images = str(demo / "images")
    config.features.weights = "none"  # random: shapes and plumbing only
    config.features.batch_size = 4
    config.text.captions = str(demo / "Flickr8k.token.txt")
    config.text.splits = str(demo)
    config.text.output = str(root / "captions")
    config.text.min_word_count = 1
    prepare_stage(config)
    return config


def train_config(config: Config, maps: Path, output: Path, model: ModelConfig = TINY) -> Config:
    config.train.features = [str(maps)]
    config.train.captions = config.text.output
    config.train.output = str(output)
    config.train.epochs = 1
    config.train.batch_size = 8
    config.train.learning_rate = 0.003
    config.model = ModelConfig(**vars(model))
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from captioner.stages.features import extract_stage
    from captioner.stages.training import train_stage

    root = tmp_path_factory.mktemp("transformer-demo")
    config = demo_config(root)
    config.features.backbone, config.features.layer = "efficientnet_b0", "top_activation"
    config.features.output = str(root / "maps.h5")
    extract_stage(config)
    train_config(config, root / "maps.h5", root / "model")
    result = train_stage(config)
    return {"root": root, "config": config, "maps": root / "maps.h5", "model": root / "model", "result": result}


def dev_batch(loaded, maps: Path, captions: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dev images' maps [N, 49, 1280] and their first captions as right-padded input ids [N, T], lengths."""
    from captioner.data.captions import read_prepared_split
    from captioner.data.spatial import MapFile

    dev = read_prepared_split(captions / "dev.json")
    ids = sorted(dev)
    with MapFile(maps) as table:
        images = table.read(ids)
    tokenizer = loaded.tokenizer
    words = [[tokenizer.start_id, *tokenizer.encode(dev[i][0])] for i in ids]
    lengths = np.array([len(w) for w in words])
    input_ids = np.zeros((len(ids), lengths.max()), np.int32)
    for row, w in enumerate(words):
        input_ids[row, : len(w)] = w
    return images, input_ids, lengths


def test_a_transformer_trained_on_demo_maps_steps_as_its_full_model(run: dict):
    from captioner.layout import CONFIG_FILE
    from captioner.models.directory import load_model_dir
    from captioner.models.transformer import TransformerStepModel
    from captioner.stages.training import train_stage

    assert run["result"].epochs_done == 1 and np.isfinite(run["result"].best_val_loss)
    info = json.loads((run["model"] / CONFIG_FILE).read_text())
    assert info["map_grid"] == [7, 7] and info["feature_dim"] == 1280
    assert info["config"]["model"]["kind"] == "transformer"
    assert info["features_provenance"]["layer"] == "top_activation" and info["features_provenance"]["backbone"] == "efficientnet_b0"
    loaded = load_model_dir(run["model"])
    assert loaded.kind == "transformer" and loaded.decoder.explains
    stepper = loaded.step_model()
    assert isinstance(stepper, TransformerStepModel) and stepper.length == 48  # model.max_positions
    images, input_ids, lengths = dev_batch(loaded, run["maps"], Path(run["config"].train.captions))
    logits = keras.ops.convert_to_numpy(loaded.model((images, input_ids), training=False)).astype(np.float64)
    full = logits - logits.max(-1, keepdims=True)
    full -= np.log(np.exp(full).sum(-1, keepdims=True))
    states = stepper.initial_state(images)
    for t in range(input_ids.shape[1]):
        log_probs, states, _ = stepper.step(input_ids[:, t], states)
        real = t < lengths
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)
    assert train_stage(run["config"]).up_to_date  # a rerun with the same inputs is a no-op


def test_save_and_load_round_trip_a_trained_transformer(run: dict, tmp_path: Path):
    from captioner.layout import CONFIG_FILE, TOKENIZER_FILE
    from captioner.models.directory import load_model_dir, save_model

    loaded = load_model_dir(run["model"])
    copy = tmp_path / "copy"
    save_model(loaded.model, copy)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        shutil.copy(run["model"] / name, copy / name)
    again = load_model_dir(copy)
    images, input_ids, _ = dev_batch(loaded, run["maps"], Path(run["config"].train.captions))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.model((images, input_ids), training=False)),
        keras.ops.convert_to_numpy(again.model((images, input_ids), training=False)),
    )


def test_beam_search_and_an_ensemble_of_transformers(run: dict, tmp_path: Path):
    from captioner.decoding.beam import beam_search
    from captioner.decoding.ensemble import load_ensemble
    from captioner.models.directory import load_model_dir

    loaded = load_model_dir(run["model"])
    images, _, _ = dev_batch(loaded, run["maps"], Path(run["config"].train.captions))
    tokenizer = loaded.tokenizer
    decode = {"start_id": tokenizer.start_id, "end_id": tokenizer.end_id, "max_generated_words": 8}
    single = beam_search(loaded.step_model(), images, beam_size=3, **decode)
    for caption in single:
        assert caption.extras["attention"].shape == (len(caption.ids) + caption.finished, 49)
    twin = tmp_path / "twin"
    shutil.copytree(run["model"], twin)
    ensemble = load_ensemble([run["model"], twin])
    assert ensemble.kind == "transformer"
    together = beam_search(ensemble.step_model(), images, beam_size=3, **decode)
    assert [c.ids for c in together] == [c.ids for c in single]  # two copies of one model decode as the model


def test_evaluate_a_transformer_on_dev_with_beam_2(run: dict, tmp_path: Path):
    from captioner.stages.evaluation import evaluate_stage

    config = Config()
    config.eval.model = str(run["model"])
    config.eval.features = [str(run["maps"])]
    config.eval.captions = run["config"].train.captions
    config.eval.split = "dev"
    config.eval.output = str(tmp_path / "eval")
    config.decode.beam_size = 2
    config.decode.max_generated_words = 8
    result = evaluate_stage(config)
    assert result.scored > 0 and result.missing_features == 0
    assert "<h2>Where the model looked" in result.html_path.read_text()  # its cross-attention, drawn


def test_finetune_a_transformer_for_one_epoch(run: dict, tmp_path: Path):
    from captioner.models.directory import load_model_dir
    from captioner.stages.finetune import finetune_stage

    config = Config()
    ft = config.finetune
    ft.model, ft.features, ft.captions = str(run["model"]), [str(run["maps"])], run["config"].train.captions
    ft.output = str(tmp_path / "scst")
    ft.epochs, ft.batch_size, ft.samples_per_image = 1, 4, 2
    config.decode.max_generated_words = 8
    result = finetune_stage(config)
    assert result.epochs_done == 1 and result.best_dev_cider is not None
    tuned = load_model_dir(tmp_path / "scst")
    assert tuned.kind == "transformer" and tuned.info["map_grid"] == [7, 7]
    # dropout is back on in the saved model: fine-tuning switched it off only while it ran
    assert {layer.rate for layer in tuned.model.layers if isinstance(layer, keras.layers.Dropout)} == {0.3}


def test_caption_explain_draws_the_transformers_cross_attention(run: dict, tmp_path: Path, capsys):
    from PIL import Image

    from captioner.cli import caption_main
    from captioner.decoding.explain import GAP, LABEL_HEIGHT, PANEL_WIDTH

    photos = sorted(Path(run["config"].features.images).glob("*.jpg"))[:2]
    out = tmp_path / "explain"
    code = caption_main(["--model", str(run["model"]), "--explain", str(out), "--decode.max_generated_words=4",
                         *map(str, photos)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, photo in zip(lines, photos):
        words = len(line.partition("\t")[2].split())
        with Image.open(out / f"{photo.stem}.png") as strip:
            assert strip.size == ((words + 1) * PANEL_WIDTH + words * GAP, PANEL_WIDTH + LABEL_HEIGHT)


def test_pooled_vectors_for_a_transformer_and_a_resume_as_another_kind_are_one_line(run: dict, tmp_path: Path,
                                                                                      capsys):
    from captioner import cli
    from captioner.data import feature_files
    from captioner.data.spatial import MapFile
    from captioner.stages.training import train_stage

    with MapFile(run["maps"]) as table:
        ids = table.ids
        pooled = {i: m.mean(axis=0) for i, m in zip(ids, table.read(ids))}
    feature_files.save_features(tmp_path / "pooled.pkl", pooled)
    config = train_config(Config(), tmp_path / "pooled.pkl", tmp_path / "model")
    config.train.captions = run["config"].train.captions
    with pytest.raises(CaptionerError, match=(
        r"pooled\.pkl: pooled feature vectors \[12, 1280\]; a map model \(model.kind attention or transformer\) "
        r"takes spatial maps \[N, H, W, C\] from an HDF5 map file"
    )):
        train_stage(config)
    assert not (tmp_path / "model").exists()  # refused before anything was written

    # the finished transformer run, resumed as an attention model: refused before loading anything
    before = {p.name: p.stat().st_mtime_ns for p in run["model"].rglob("*") if p.is_file()}
    code = cli.main(["train", "--features", str(run["maps"]), "--captions", run["config"].train.captions,
                     "--output", str(run["model"]), "--resume", "--model.kind=attention", "--train.epochs=2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot resume {run['model']}: changed since its checkpoint: " in err and "model.kind" in err
    assert {p.name: p.stat().st_mtime_ns for p in run["model"].rglob("*") if p.is_file()} == before


@pytest.mark.slow  # a VGG16 with random weights over 12 demo photos, then two 1-epoch runs: tens of seconds
def test_a_keras_vgg16_map_feeds_the_attention_and_the_transformer_models(tmp_path: Path):
    from captioner.data.spatial import MapFile
    from captioner.decoding.beam import beam_search
    from captioner.models.directory import load_model_dir
    from captioner.stages.features import extract_stage
    from captioner.stages.training import train_stage

    config = demo_config(tmp_path)
    config.features.backbone, config.features.layer = "vgg16", "block5_pool"
    config.features.output = str(tmp_path / "vgg16-block5_pool.h5")
    extracted = extract_stage(config)
    assert extracted.images == 12 and extracted.feature_dim == 512
    with MapFile(config.features.output) as maps:
        assert (len(maps), maps.grid, maps.channels) == (12, (7, 7), 512)
    attention = ModelConfig(kind="attention", embedding_dim=8, units=8, attention_dim=8)
    for model in (attention, TINY):
        train_config(config, Path(config.features.output), tmp_path / model.kind, model)
        assert train_stage(config).epochs_done == 1
        loaded = load_model_dir(tmp_path / model.kind)
        assert loaded.kind == model.kind and loaded.info["map_grid"] == [7, 7] and loaded.info["feature_dim"] == 512
        images, _, _ = dev_batch(loaded, Path(config.features.output), Path(config.train.captions))
        tokenizer = loaded.tokenizer
        for caption in beam_search(loaded.step_model(), images, start_id=tokenizer.start_id, end_id=tokenizer.end_id,
                                   beam_size=2, max_generated_words=5):
            assert caption.extras["attention"].shape[1] == 49
