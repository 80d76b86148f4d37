"""The image classifier: a compact CNN whose size is set by one width parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core import StepError


class ModelLoadError(StepError):
    """The trained model is missing, damaged, or not the pipeline's network."""


def load_trained(path: str, manifest: dict[str, Any] | None = None) -> Any:
    """The trained Keras 3 model at ``path``; a ModelLoadError (an input error: no retry) if it is missing or
    unreadable (Keras says "File not found" of a file that exists but is not a model), or, given the dataset's
    ``manifest``, if it does not take that dataset's images or answer its classes."""
    model_path = Path(path)
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path}: trained model not found; run the train step first (or check --model-path)")
    import keras

    try:
        net = keras.models.load_model(model_path, compile=False)  # for predicting and rebuilding, not training
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a damaged file; all mean the same
        raise ModelLoadError(f"{model_path}: cannot load the trained model ({type(exc).__name__}: {exc}); "
                             "the file is damaged or not a Keras model: run the train step again") from None
    if manifest is not None:
        takes, answers = tuple(net.input_shape[1:]), net.output_shape[-1]
        shape, classes = tuple(manifest["image_shape"]), manifest["num_classes"]
        if takes != shape or answers != classes:
            raise ModelLoadError(
                f"{model_path}: the model takes images of {takes} and answers {answers} classes, but dataset "
                f"{manifest['dataset']} ({manifest['digest'][:16]}) has images of {shape} in {classes} classes: "
                "it was trained on other data; give the model this run's train step wrote, or its dataset")
    return net


MIN_IMAGE_SIDE = 4  # the CNN's two 2x2 poolings: a side under 4 pixels pools to nothing


def size_error(image_shape: tuple[int, ...]) -> str:
    """Why images of this shape cannot go through the CNN ("" if they can)."""
    if min(image_shape) >= MIN_IMAGE_SIDE:
        return ""
    return (f"images of {'x'.join(map(str, image_shape))} pixels are too small for the CNN: its two 2x2 poolings "
            f"need at least {MIN_IMAGE_SIDE} pixels on each side; pad or upscale the images (MNIST's are 28x28) "
            "and prepare them again")


def build(*, image_shape: tuple[int, int], num_classes: int, width: int = 32, dropout: float = 0.2,
          keras_module: Any = None, synchronized: bool = False) -> Any:
    """A Keras CNN taking float32 pixels in 0..255 of shape (H, W); scaling is part of the model.

    conv(w) at full resolution, conv(2w) at half, conv(2w) at quarter, then a linear classifier over the
    flattened features. Width 32 gives about 88K parameters and ~5.6M multiply-adds per 28x28 image.
    ``keras_module`` builds the same network with another Keras (compress passes ``tf_keras``, which
    tensorflow-model-optimization needs); its weights come in the same order.
    ``synchronized``: batch normalization over the global batch of a distributed strategy (several GPUs); else
    each GPU normalizes its own slice and keeps moving statistics of its own, of which the saved model holds
    GPU 0's. The same variables either way.
    """
    if error := size_error(image_shape):
        raise StepError(error)
    if keras_module is None:
        import keras as keras_module
    keras = keras_module
    layers = keras.layers

    inputs = keras.Input(shape=image_shape, name="image", dtype="float32")
    x = layers.Reshape((*image_shape, 1))(inputs)
    x = layers.Rescaling(1 / 255.0)(x)
    for i, filters in enumerate((width, width * 2, width * 2)):
        if i:
            x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9, synchronized=synchronized)(x)
        x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    # Softmax in float32 even under mixed precision, for numerically stable probabilities.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"cnn_w{width}")


def compiled(*, image_shape: tuple[int, int], num_classes: int, width: int, dropout: float, learning_rate: float,
             decay_steps: int, synchronized: bool = False) -> Any:
    """:func:`build`, compiled as every training run compiles it: Adam with cosine decay to 0 over ``decay_steps``."""
    import keras

    net = build(image_shape=image_shape, num_classes=num_classes, width=width, dropout=dropout,
                synchronized=synchronized)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    net.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])
    return net
