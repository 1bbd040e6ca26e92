"""The encoder is the seed's, bit widths come from one config, saved models reload exactly."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CALQ

from ecqae import config, data, model
from ecqae.errors import EcqaeError


def test_encoder_parameter_count_is_the_seeds():
    enc = model.build_encoder(config.ModelConfig())
    counts = {layer.name: layer.count_params() for layer in enc.layers}
    assert counts["conv2d"] == 80 and counts["dense"] == 2064
    assert enc.count_params() == 2144
    assert enc.output_shape == (None, 16)
    assert enc.get_layer("conv2d").output_shape == (None, 4, 4, 8)


@pytest.mark.parametrize("elinks, bits", [(2, 3), (3, 5), (4, 7), (5, 9)])
def test_latent_width_follows_elinks(elinks, bits):
    cfg = config.ModelConfig(elinks=elinks)
    enc = model.build_encoder(cfg)
    q = model.check_encoder(enc)
    assert q.latent_bits == bits and cfg.latent_bits == bits
    rng = np.random.default_rng(0)
    x = rng.random((256, 9, 9, 1)).astype(np.float32)
    codes = model.encode(enc, x) * 2 ** (bits - 1)
    np.testing.assert_array_equal(codes, np.round(codes))
    assert codes.max() <= 2**bits - 1 and codes.min() >= 0


def test_quantizers_come_from_config():
    q = config.QuantConfig(conv_act_bits=6, conv_act_integer=2)
    enc = model.build_encoder(config.ModelConfig(quant=q))
    assert model.check_encoder(enc).conv_act_bits == 6
    assert str(enc.get_layer("conv_act").quantizer) == "quantized_relu(6,2)"


def test_latent_bits_must_fit_the_elinks():
    with pytest.raises(ValueError, match="do not fit"):
        config.ModelConfig(elinks=2, quant=config.QuantConfig(latent_bits=9))


def test_decoder_is_conditional_and_conserves_fractions():
    enc, dec, cae = model.build_cae(config.ModelConfig())
    assert [tuple(i.shape[1:]) for i in dec.inputs] == [(16,), (2,)]
    w = data.prepare(data.read_csv(CALQ, eta="2.0", max_rows=64))
    out = cae.predict([w.images, w.cond], verbose=0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(out >= 0)
    _, plain, _ = model.build_cae(config.ModelConfig(conditional=False))
    assert len(plain.inputs) == 1


def test_saved_encoder_reloads_with_identical_outputs(tmp_path):
    enc = model.build_encoder(config.ModelConfig(elinks=3))
    rng = np.random.default_rng(1)
    enc.set_weights([rng.normal(0, 0.4, w.shape).astype(np.float32) for w in enc.get_weights()])
    x = data.prepare(data.read_csv(CALQ, eta="2.0", max_rows=2000)).images
    enc.save(tmp_path / "enc.h5")
    again = model.load_model(tmp_path / "enc.h5")
    assert model.check_encoder(again) == model.check_encoder(enc)
    np.testing.assert_array_equal(model.encode(enc, x), model.encode(again, x))


def test_foreign_and_truncated_model_files(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(EcqaeError, match="not a readable Keras model"):
        model.load_model(bad)
    enc = model.build_encoder(config.ModelConfig())
    enc.save(tmp_path / "enc.h5")
    raw = (tmp_path / "enc.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EcqaeError, match="cut.h5"):
        model.load_model(tmp_path / "cut.h5")


def test_non_contract_encoder_refused_naming_the_layer():
    from tensorflow import keras

    inp = keras.Input((9, 9, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, name="plain_conv")(inp)
    bad = keras.Model(inp, x)
    with pytest.raises(EcqaeError, match="'plain_conv' is Conv2D, expected QConv2D"):
        model.check_encoder(bad)
