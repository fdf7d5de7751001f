"""A tiny untrained model directory, as training would write it, for the evaluation and caption tests."""

from __future__ import annotations

from pathlib import Path

from captioner import model as model_lib
from captioner.config import Config
from captioner.tokenizer import Tokenizer


def make_model_dir(model_dir: Path, train_captions: list[str], provenance: dict, feature_dim: int) -> Path:
    """model.keras (embedding and LSTM of 8, seeded), tokenizer.json and config.json in `model_dir`."""
    import keras

    config = Config()
    config.model.embedding_dim = 8
    config.model.units = 8
    tokenizer = Tokenizer.build(train_captions, min_word_count=1)
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(feature_dim, tokenizer.vocab_size, config.model)
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / "tokenizer.json")
    model_lib.write_model_config(model_dir, config, feature_dim, tokenizer.vocab_size, provenance)
    return model_dir
