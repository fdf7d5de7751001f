"""captioner: the classic image-captioning pipeline (VGG16 fc2 features + merge LSTM), correct and fast.

Importing the package does no work and does not import TensorFlow; the modules
that need Keras import it when called.
"""

__version__ = "0.1.0"
