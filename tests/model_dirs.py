"""Model directories for the evaluation and caption tests, as training would write them.

`make_model_dir`: a tiny untrained (seeded) model: captions are some words of its vocabulary.

`make_attention_model_dir`: a tiny untrained (seeded) attention (or transformer) model for maps
[positions, channels].

`convert_tiny_tflite`: a tiny full-int8 .tflite backbone (8-d pooled features), and
`tflite_provenance`: the features provenance `captioner extract` records for it.

`make_known_model_dir`: a model whose weights are set by hand so that its captions are
known in advance. It reads 3-d image features, the mean caffe-preprocessed pixel of the
image (B, G, R minus the ImageNet means; the tests pair it with a global-average-pooling
"backbone"), and captions a pure red image "a red circle" and a pure blue one "a blue
square". How, with V the vocabulary size and a = tanh(tanh(3)):

- embedding: 3 x the identity (dimension V); the LSTM's input, forget and output gates
  are saturated open, shut and open (biases +20, -20, +20), its candidate reads the
  embedding one to one, its recurrent weights are zero: after word w, h = a at unit w
  and 0 elsewhere. Units V and V+1 are left to the image.
- image_dense: unit V = relu(R / 100), unit V+1 = relu(B / 100) (R, B: the red and
  blue means after preprocessing, so a red image lights V only, a blue image V+1 only).
- decoder_dense (relu): units 0..V-1 copy the word units; unit V = relu(word "a" +
  red - 1.6), unit V+1 = relu(word "a" + blue - 1.6): "after 'a', in a red (blue) image".
- logits: 10 x the word unit of each word -> the word that follows it (start -> a,
  red -> circle, blue -> square, circle -> end, square -> end), and 20 x unit V -> red,
  20 x unit V+1 -> blue. Every other logit is 0.

So each step's logits are one positive value and zeros: start gives "a" (logit 10a),
"a" gives the colour (logit 20 (a + colour - 1.6)), then the shape, then the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.config import Config
from captioner.data.tokenizer import Tokenizer
from captioner.layout import TOKENIZER_FILE
from captioner.models import directory as model_lib
from captioner.models import merge as merge_lib

KNOWN_CAPTIONS = {"red": "a red circle", "blue": "a blue square"}
KNOWN_PROVENANCE = {
    "backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32",
}


def make_model_dir(
    model_dir: Path, train_captions: list[str], provenance: dict, feature_dim: int, init_inject: bool = False
) -> Path:
    """model.keras (embedding and LSTM of 8, seeded; `model.init_inject` as given), tokenizer.json and
    config.json in `model_dir`."""
    import keras

    config = Config()
    config.model.embedding_dim = 8
    config.model.units = 8
    config.model.init_inject = init_inject
    tokenizer = Tokenizer.build(train_captions, min_word_count=1)
    keras.utils.set_random_seed(0)
    model = merge_lib.build_model(feature_dim, tokenizer.vocab_size, config.model)
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    model_lib.write_model_config(model_dir, config, feature_dim, tokenizer.vocab_size, provenance)
    return model_dir


def make_attention_model_dir(
    model_dir: Path, train_captions: list[str], provenance: dict, grid: tuple[int, int], channels: int,
    kind: str = "attention",
) -> Path:
    """model.keras (seeded: an attention model with embedding, units and attention of 8, or with kind
    "transformer" one of width 8, 2 blocks of 2 heads and 12 positions), tokenizer.json and
    config.json (map_grid `grid`, feature_dim `channels`) in `model_dir`."""
    import keras

    from captioner.models import registry

    config = Config()
    config.model.kind = kind
    if kind == "transformer":
        config.model.units, config.model.heads, config.model.layers = 8, 2, 2
        config.model.feedforward_dim, config.model.max_positions = 16, 12
    else:
        config.model.embedding_dim = config.model.units = config.model.attention_dim = 8
    tokenizer = Tokenizer.build(train_captions, min_word_count=1)
    keras.utils.set_random_seed(0)
    shape = registry.FeatureShape(channels, grid[0] * grid[1])
    model = registry.get(kind).build(shape, tokenizer.vocab_size, config.model)
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    model_lib.write_model_config(model_dir, config, channels, tokenizer.vocab_size, provenance, map_grid=grid)
    return model_dir


def convert_tiny_tflite(path: Path) -> Path:
    """A tiny random classifier at 224x224 as a full-int8 .tflite (uint8 raw-pixel input, [-1, 1]
    calibration, as the shared MobileNetV2): its pooled tensor is 8 wide."""
    import warnings

    import keras
    import tensorflow as tf

    from captioner.data.images import preprocess_tf

    keras.utils.set_random_seed(4)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(8, 8, strides=8, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))

    def representative():
        for seed in range(4):
            pixels = np.random.default_rng(seed).integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
            pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
            yield [preprocess_tf(pixels)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        path.write_bytes(converter.convert())
    return path


def tflite_provenance(path: Path) -> dict:
    """What `captioner extract --backbone mobilenet_v2 --weights PATH` records for a .tflite backbone."""
    from captioner.vision import backbones

    spec = backbones.get_backbone("mobilenet_v2")
    with backbones.open_tflite(spec, path) as model:
        return backbones.extractor_params(spec.name, "", str(path), "", "", model)


def make_known_model_dir(model_dir: Path) -> Path:
    """The hand-weighted model described in the module docstring, with KNOWN_PROVENANCE and 3-d features."""
    tokenizer = Tokenizer.build(list(KNOWN_CAPTIONS.values()), min_word_count=1)
    vocab = tokenizer.vocab_size
    red_unit, blue_unit = vocab, vocab + 1
    units = vocab + 2
    config = Config()
    config.model.embedding_dim = vocab
    config.model.units = units
    model = merge_lib.build_model(3, vocab, config.model)
    ids = {word: tokenizer.word_id(word) for word in ("a", "red", "circle", "blue", "square")}

    model.get_layer("embedding").set_weights([3.0 * np.eye(vocab, dtype=np.float32)])

    kernel = np.zeros((vocab, 4 * units), np.float32)  # gate blocks in Keras' order: input, forget, candidate, output
    kernel[np.arange(vocab), 2 * units + np.arange(vocab)] = 1.0
    bias = np.zeros(4 * units, np.float32)
    bias[:units], bias[units : 2 * units], bias[3 * units :] = 20.0, -20.0, 20.0
    model.get_layer("lstm").set_weights([kernel, np.zeros((units, 4 * units), np.float32), bias])

    image = np.zeros((3, units), np.float32)  # features are (B, G, R)
    image[2, red_unit] = 0.01
    image[0, blue_unit] = 0.01
    model.get_layer("image_dense").set_weights([image, np.zeros(units, np.float32)])

    hidden = np.zeros((units, units), np.float32)
    hidden[np.arange(vocab), np.arange(vocab)] = 1.0
    hidden[[ids["a"], red_unit], red_unit] = 1.0
    hidden[[ids["a"], blue_unit], blue_unit] = 1.0
    hidden_bias = np.zeros(units, np.float32)
    hidden_bias[[red_unit, blue_unit]] = -1.6
    model.get_layer("decoder_dense").set_weights([hidden, hidden_bias])

    logits = np.zeros((units, vocab), np.float32)
    for word, following in [
        (tokenizer.start_id, ids["a"]), (ids["red"], ids["circle"]), (ids["blue"], ids["square"]),
        (ids["circle"], tokenizer.end_id), (ids["square"], tokenizer.end_id),
    ]:
        logits[word, following] = 10.0
    logits[red_unit, ids["red"]] = 20.0
    logits[blue_unit, ids["blue"]] = 20.0
    model.get_layer("logits").set_weights([logits, np.zeros(vocab, np.float32)])

    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    model_lib.write_model_config(model_dir, config, 3, vocab, KNOWN_PROVENANCE)
    return model_dir
