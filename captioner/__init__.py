"""captioner: staged image captioning on frozen CNN features.

Features are extracted once and cached (VGG16 fc2 by default, as in the course; an int8
MobileNetV2 through LiteRT as the measured CPU path); captions become a vocabulary and
teacher-forced batches; a merge or a soft-attention LSTM decoder (Keras 3) learns to caption;
self-critical training fine-tunes it on CIDEr-D; BLEU-1..4 and CIDEr-D score it; beam search
(numpy) captions photos for `caption` and `captioner serve`.

Importing the package does no work and does not import TensorFlow; the modules
that need Keras import it when called.
"""

__version__ = "0.1.0"
