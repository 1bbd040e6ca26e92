"""The conditional autoencoder: the seed's QKeras encoder and our float decoder.

Encoder (on chip, exactly the seed's size): 9x9x1 -> QConv2D(8, 3x3, stride 2)
-> quantized ReLU -> Flatten -> QDense(16) -> latent quantizer; 80 + 2,064
parameters. Every bit width comes from ``QuantConfig``.

Decoder (off detector, free): [latent(16), log-sum, eta] -> Dense+ReLU blocks
-> Dense(48) -> softmax. The softmax makes the reconstruction a set of
non-negative fractions summing to one, so multiplying by the decoded charge sum
conserves energy by construction; sum and eta tell it the regime (sparse
low-energy wafers, thin noisy sensors at high eta, pileup density).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
from qkeras import QActivation, QConv2D, QDense
from qkeras.utils import _add_supported_quantized_objects
from tensorflow import keras

from . import chip
from .config import ModelConfig, QuantConfig
from .errors import EcqaeError

# Keras 2.15 warns on every HDF5 save and on QKeras quantizer serialisation;
# HDF5 is what hls4ml reads, and the quantizers round-trip (tested).
warnings.filterwarnings("ignore", message=r".*HDF5 file via `model.save\(\)`.*")
warnings.filterwarnings("ignore", message=r".*keras.constraints.serialize\(\)`.*")
tf.get_logger().setLevel("ERROR")

N_COND = 2  # decoder conditions: encoded-then-decoded log sum, eta
ENCODER_LAYERS = ("InputLayer", "QConv2D", "QActivation", "Flatten", "QDense", "QActivation")


def build_encoder(cfg: ModelConfig) -> keras.Model:
    """The seed's encoder with the configured quantizers."""
    q = cfg.quant
    inp = keras.Input((chip.IMAGE_SIZE, chip.IMAGE_SIZE, 1), name="wafer")
    x = QConv2D(
        8,
        (3, 3),
        strides=(2, 2),
        padding="valid",
        kernel_quantizer=q.weight_quantizer,
        bias_quantizer=q.weight_quantizer,
        name="conv2d",
    )(inp)
    x = QActivation(q.conv_act_quantizer, name="conv_act")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = QDense(
        chip.N_LATENT,
        kernel_quantizer=q.weight_quantizer,
        bias_quantizer=q.weight_quantizer,
        name="dense",
    )(x)
    x = QActivation(q.latent_quantizer, name="latent")(x)
    return keras.Model(inp, x, name="encoder")


def build_decoder(cfg: ModelConfig) -> keras.Model:
    """Float decoder; with ``conditional=False`` it sees the latents only (ablation)."""
    latent = keras.Input((chip.N_LATENT,), name="latent")
    cond = keras.Input((N_COND,), name="cond")
    x = keras.layers.Concatenate(name="latent_cond")([latent, cond]) if cfg.conditional else latent
    for i, units in enumerate(cfg.decoder_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dec_dense{i}")(x)
    x = keras.layers.Dense(chip.N_TC, name="dec_out")(x)
    out = keras.layers.Softmax(name="tc_fractions")(x)
    inputs = [latent, cond] if cfg.conditional else [latent]
    return keras.Model(inputs, out, name="decoder")


def build_cae(cfg: ModelConfig) -> tuple[keras.Model, keras.Model, keras.Model]:
    """(encoder, decoder, full model); the full model takes [wafer image, cond]."""
    encoder, decoder = build_encoder(cfg), build_decoder(cfg)
    wafer = keras.Input((chip.IMAGE_SIZE, chip.IMAGE_SIZE, 1), name="wafer")
    cond = keras.Input((N_COND,), name="cond")
    latent = encoder(wafer)
    out = decoder([latent, cond]) if cfg.conditional else decoder(latent)
    cae = keras.Model([wafer, cond], out, name="cae")
    return encoder, decoder, cae


def decode(decoder: keras.Model, latent: np.ndarray, cond: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """TC fractions from latents (and conditions, if the decoder takes them)."""
    inputs = [latent, cond] if len(decoder.inputs) == 2 else [latent]
    return decoder.predict(inputs, batch_size=batch_size, verbose=0)


def custom_objects() -> dict[str, object]:
    objs: dict[str, object] = {}
    _add_supported_quantized_objects(objs)
    return objs


def load_model(path: str | Path) -> keras.Model:
    """Reload a saved model with its quantizers; unreadable files are one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise EcqaeError(f"{p}: model file not found")
    try:
        return keras.models.load_model(p, custom_objects=custom_objects(), compile=False)
    except Exception as exc:  # h5py/Keras raise many types for foreign or truncated files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EcqaeError(f"{p}: not a readable Keras model ({msg})") from None


_QUANTIZER_ATTR = {"kernel": "kernel_quantizer_internal", "bias": "bias_quantizer_internal", "act": "quantizer"}


def _quantizer_bits(layer: keras.layers.Layer, which: str, kind: str, where: str) -> tuple[int, int]:
    """(bits, integer) of a layer's quantizer object, which must be of class ``kind``."""
    quantizer = getattr(layer, _QUANTIZER_ATTR[which], None)
    if type(quantizer).__name__ != kind:
        raise EcqaeError(f"{where}: layer '{layer.name}' {which} quantizer is {quantizer}, expected {kind}")
    if kind == "quantized_bits" and (quantizer.alpha not in (1, 1.0) or not quantizer.keep_negative):
        raise EcqaeError(f"{where}: layer '{layer.name}' {which} quantizer must have alpha=1, keep_negative")
    return int(quantizer.bits), int(quantizer.integer)


def check_encoder(model: keras.Model, where: str = "encoder") -> QuantConfig:
    """Refuse anything but the seed's encoder; return the bit widths it was trained with.

    The firmware and golden model rely on this exact layer sequence, so a model
    with another layer type or size is rejected naming the offending layer.
    """
    layers = model.layers
    kinds = tuple(type(layer).__name__ for layer in layers)
    for i, expected in enumerate(ENCODER_LAYERS):
        if i >= len(layers):
            raise EcqaeError(f"{where}: encoder ends after {len(layers)} layers, expected a {expected} next")
        if kinds[i] != expected:
            raise EcqaeError(
                f"{where}: layer '{layers[i].name}' is {kinds[i]}, expected {expected} "
                f"(encoder contract: {' -> '.join(ENCODER_LAYERS)})"
            )
    if len(layers) > len(ENCODER_LAYERS):
        extra = layers[len(ENCODER_LAYERS)]
        raise EcqaeError(f"{where}: unsupported extra layer '{extra.name}' ({type(extra).__name__})")
    conv, dense = layers[1], layers[4]
    if tuple(model.input_shape[1:]) != (chip.IMAGE_SIZE, chip.IMAGE_SIZE, 1):
        raise EcqaeError(f"{where}: input shape {model.input_shape[1:]}, expected (9, 9, 1)")
    if conv.filters != 8 or tuple(conv.kernel_size) != (3, 3) or tuple(conv.strides) != (2, 2):
        raise EcqaeError(f"{where}: layer '{conv.name}' must be 8 filters, 3x3, stride 2")
    if conv.padding != "valid":
        raise EcqaeError(f"{where}: layer '{conv.name}' padding must be 'valid'")
    if dense.units != chip.N_LATENT:
        raise EcqaeError(f"{where}: layer '{dense.name}' has {dense.units} units, expected {chip.N_LATENT}")
    wb, wi = _quantizer_bits(conv, "kernel", "quantized_bits", where)
    for layer in (conv, dense):
        for which in ("kernel", "bias"):
            if _quantizer_bits(layer, which, "quantized_bits", where) != (wb, wi):
                raise EcqaeError(f"{where}: layer '{layer.name}' {which} quantizer differs from the conv kernel's")
    ab, ai = _quantizer_bits(layers[2], "act", "quantized_relu", where)
    lb, li = _quantizer_bits(layers[5], "act", "quantized_relu", where)
    return QuantConfig(
        weight_bits=wb,
        weight_integer=wi,
        conv_act_bits=ab,
        conv_act_integer=ai,
        latent_bits=lb,
        latent_integer=li,
    )


def encode(encoder: keras.Model, images: np.ndarray, batch_size: int = 16384) -> np.ndarray:
    """QKeras forward pass of the encoder (float32 values on the latent grid)."""
    return encoder.predict(images, batch_size=batch_size, verbose=0)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic (resume = rerun)."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
