"""A pretrained ``keras.applications`` backbone with a classification head (``model=backbone``).

The builder of the model group's ``backbone`` option (conf/model/backbone.yaml), called like
any builder (sweeper.builder) with float32 images in [0, 1] of the data's shape. In front of
the backbone the model does what the backbone expects of its input, so that the exported
``best_model.keras`` still takes raw uint8 images of the data's shape:

- images smaller than the backbone accepts (32x32 for every backbone here) are resized up to
  it (bilinear); larger ones keep their size (``data.image_size`` chooses it);
- grayscale images are repeated to three channels (ImageNet's RGB);
- the pixel scaling of ``keras.applications.<family>.preprocess_input``: MobileNetV3 and
  EfficientNetV2 bring their own rescaling layers (``include_preprocessing``) and get pixels
  in [0, 255]; ResNet50V2 gets [-1, 1] (``preprocess_input``'s "tf" mode).

The head: global average pooling, dropout, an optional hidden ReLU layer of ``dense_units``
(with the same dropout after it), and a softmax over the data's classes.

Fine-tuning follows the Keras transfer-learning guide: ``trainable_fraction`` 0 freezes the
backbone (only the head trains), 1 trains all of it, and values between train the top
fraction of its layers. With pretrained weights (``imagenet`` or a file) batch normalization
stays in inference mode throughout: the guide
calls the backbone with ``training=False``, which Keras 3 overrides when the outer model
trains (keras-team/keras#20285, seen in Keras 3.15), so every batch-norm layer of the
backbone is also set not trainable, which keeps it in inference mode (its moving statistics
and its scale and shift stay as pretrained). A backbone trained with batch statistics of a
few small batches is what trained to 10% on Fashion-MNIST in issue 42. A randomly
initialized backbone (``weights: null``) has no statistics to keep: its batch normalization
trains as in any network trained from scratch.

A per-layer learning rate for the backbone against the head is not offered: Keras 3 has no
optimizer over two variable groups with their own rates (no MultiOptimizer), and scaling the
backbone's gradients would need a custom gradient per backend.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import keras
from keras import layers

from sweeper.compat import imagenet_weights_file
from sweeper.config import BACKBONES, IMAGENET, ConfigError

logger = logging.getLogger(__name__)

# The smallest side every backbone here accepts (keras.applications refuses smaller inputs).
MIN_SIDE = 32
# Backbones whose keras.applications model rescales [0, 255] pixels itself
# (include_preprocessing=True); the others get preprocess_input's scaling from us.
OWN_PREPROCESSING = frozenset({"MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0"})


def backbone(input_shape: tuple[int, int, int], num_classes: int,
             name: str = "MobileNetV3Small", weights: str | None = IMAGENET,
             dropout: float = 0.2, dense_units: int = 0,
             trainable_fraction: float = 0.0) -> keras.Model:
    """A ``keras.applications`` backbone without its top, and a head for ``num_classes``.

    Args:
        input_shape: (H, W, C) of float32 images in [0, 1], C 1 (grayscale) or 3 (RGB).
        num_classes: Outputs of the softmax.
        name: The backbone as keras.applications names it (sweeper.config.BACKBONES).
        weights: ``imagenet`` (Keras' download and cache, ``~/.keras/models/``), None
            (random initialization) or the path of a weights file of the backbone without
            its top (``.h5`` as Keras downloads it, ``.weights.h5`` from ``save_weights``).
        dropout: Dropout rate after the pooling (and after the hidden layer).
        dense_units: Units of a hidden ReLU layer in the head; 0: none.
        trainable_fraction: Share of the backbone's layers trained, from the top: 0 freezes
            it, 1 trains all. Batch normalization of pretrained weights is never trained
            (module docstring).

    Raises:
        ConfigError: images with 4 channels; ImageNet weights that cannot be downloaded (no
            network: ``model.weights=PATH``); a weights file that does not fit the backbone.
    """
    height, width, channels = (int(side) for side in input_shape)
    if channels not in (1, 3):
        raise ConfigError("model.name", name, f"a backbone takes grayscale or RGB images; these "
                          f"have {channels} channels (save them as RGB)")
    size = (max(height, MIN_SIDE), max(width, MIN_SIDE))
    inputs = keras.Input(shape=(height, width, channels), name="pixels")
    x = inputs
    if size != (height, width):
        x = layers.Resizing(*size, interpolation="bilinear", name="resize_to_backbone")(x)
    if channels == 1:
        x = layers.Concatenate(name="grayscale_to_rgb")([x, x, x])
    if name in OWN_PREPROCESSING:
        x = layers.Rescaling(255.0, name="to_0_255")(x)
    else:  # preprocess_input's "tf" mode: [-1, 1]
        x = layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(x)
    network = pretrained(name, weights, (*size, 3))
    freeze(network, trainable_fraction, keep_batch_norm=weights is not None)
    # Pretrained: batch norm in inference mode (the guide's training=False; freeze() makes it
    # hold in Keras 3). Randomly initialized: its statistics are learnt like any weight.
    x = network(x, training=False) if weights is not None else network(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    if dense_units > 0:
        x = layers.Dense(dense_units, activation="relu", name="hidden")(x)
        x = layers.Dropout(dropout, name="hidden_dropout")(x)
    # float32 softmax under mixed precision: float16 probabilities underflow.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="classes")(x)
    return keras.Model(inputs, outputs, name=f"backbone_{name}")


def pretrained(name: str, weights: str | None, input_shape: tuple[int, int, int]) -> keras.Model:
    """``keras.applications.<name>`` without its top for ``input_shape``, with ``weights``.

    ``imagenet``: the file keras.applications caches (:func:`sweeper.compat.imagenet_weights_file`)
    is loaded when it is there (no network needed; Keras' hash of its own download is not
    checked), else keras.applications downloads it into that cache.

    Raises:
        ConfigError: as :func:`backbone`.
    """
    if name not in BACKBONES:
        raise ConfigError("model.name", name, f"must be one of {', '.join(BACKBONES)}")
    application = getattr(keras.applications, name)
    options = {"include_top": False, "input_shape": input_shape}
    if name in OWN_PREPROCESSING:
        options["include_preprocessing"] = True
    if weights == IMAGENET:
        cached = imagenet_weights_file(name)
        if not cached.is_file():
            try:
                with warnings.catch_warnings():
                    # "Weights for input shape (224, 224) will be loaded": without the top,
                    # no weight depends on the input size.
                    warnings.filterwarnings("ignore", message=".*input_shape.*",
                                            category=UserWarning)
                    return application(weights=IMAGENET, **options)
            except Exception as error:  # Keras wraps network errors in plain Exception
                raise ConfigError("model.weights", IMAGENET, f"cannot download {name}'s "
                                  f"ImageNet weights ({_first_line(error)}); offline, set "
                                  f"model.weights=PATH to a copy of {cached.name} (Keras' "
                                  f"cache: {cached.parent}/), or model.weights=null for "
                                  "random initialization") from None
        path = cached
    elif weights is None:
        return application(weights=None, **options)
    else:
        path = Path(weights).expanduser()
    network = application(weights=None, **options)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            network.load_weights(str(path))
        # Keras loads what matches of a .weights.h5 file and only warns about the rest
        # ("Skipping ...", "... could not be loaded"): layers left at random weights.
        skipped = [str(warning.message) for warning in caught
                   if "skipping" in str(warning.message).lower()
                   or "not be loaded" in str(warning.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as error:  # h5py's, Keras' and the OS's errors alike: the file is wrong
        raise ConfigError("model.weights", str(weights), f"{path} does not hold {name}'s "
                          f"weights without its top ({_first_line(error)}); give the file "
                          f"keras.applications.{name}(include_top=False) saves or downloads "
                          "(.h5 or .weights.h5)") from None
    return network


def freeze(network: keras.Model, trainable_fraction: float, keep_batch_norm: bool = True) -> None:
    """Train the top ``trainable_fraction`` of ``network``'s layers (0: none); with
    ``keep_batch_norm`` (pretrained weights) batch normalization never: it stays in inference
    mode with its pretrained statistics (the module docstring says why)."""
    if trainable_fraction <= 0:
        network.trainable = False
        return
    frozen = len(network.layers) - round(trainable_fraction * len(network.layers))
    for index, layer in enumerate(network.layers):
        layer.trainable = index >= frozen and not (
            keep_batch_norm and isinstance(layer, layers.BatchNormalization))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
