"""Golden integer model: equals QKeras bit for bit; register image and output word round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from conftest import CALQ, ROOT, TTBAR
from hypothesis import given, settings
from hypothesis import strategies as st

from ecqae import chip, data, golden, verify
from ecqae.config import ModelConfig, QuantConfig
from ecqae.errors import EcqaeError


@pytest.fixture(scope="module")
def real_charges() -> np.ndarray:
    """Every real wafer of both shared samples (44,432) followed by the corner cases."""
    real = [data.read_csv(path, eta="2.2").charges for path in (TTBAR, CALQ)]
    return np.concatenate([*real, verify.corner_cases().charges]).astype(np.int64)


def qkeras_codes(encoder, charges: np.ndarray, latent_scale: int) -> np.ndarray:
    """QKeras forward pass on the same inputs, as latent codes; refuses values off the latent grid."""
    from ecqae import model

    x, _ = chip.normalise(charges)
    scaled = model.encode(encoder, chip.tc_to_image(x)).astype(np.float64) * latent_scale
    assert np.array_equal(scaled, np.rint(scaled)), "QKeras latents off the latent grid"
    return scaled.astype(np.int64)


def random_encoder(elinks: int, seed: int, bias_shift: int = 0):
    """A contract encoder with random weights on the 1/32 grid (ties and saturation in plenty)."""
    from ecqae import model

    enc = model.build_encoder(ModelConfig(elinks=elinks))
    rng = np.random.default_rng(seed)
    weights = [rng.integers(-32, 32, size=w.shape) for w in enc.get_weights()]
    weights[3] = np.clip(weights[3] + bias_shift, -32, 31)  # dense bias: move latents off zero
    enc.set_weights([w / 32 for w in weights])
    return enc


def tie_counts(enc: golden.IntegerEncoder, charges: np.ndarray) -> tuple[int, int]:
    """How many conv and latent roundings fell exactly halfway (where half-to-even matters)."""
    q = enc.quant
    conv, _, dense = enc.accumulators(enc.input_codes(charges))
    s1 = chip.INPUT_FRAC_BITS + chip.WEIGHT_FRAC_BITS - (q.conv_act_bits - q.conv_act_integer)
    s2 = q.conv_act_bits - q.conv_act_integer + chip.WEIGHT_FRAC_BITS - (enc.latent_bits - q.latent_integer)
    ties = [int(np.sum((a & ((1 << s) - 1)) == (1 << (s - 1)))) for a, s in ((conv, s1), (dense, s2))]
    return ties[0], ties[1]


# ----------------------------------------------------------------------------- arithmetic


@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 40), 1 << 40), st.integers(-3, 12))
def test_round_shift_is_round_half_to_even(acc, shift):
    expected = round(Fraction(acc, 1 << shift)) if shift >= 0 else acc << -shift  # Python rounds half to even
    assert int(golden.round_shift(np.array([acc]), shift)[0]) == expected


def test_relu_codes_saturate_and_floor_at_zero():
    acc = np.array([-1000, -1, 0, 31, 32, 33, 95, 96, 255 * 64, 255 * 64 + 32, 10**9])
    got = golden.relu_codes(acc, 13, 8, 1)  # conv act: grid 2^-7 from the 2^-13 accumulator
    assert got.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 255, 255, 255]


# ----------------------------------------------------------------------------- input grid and corner cases


def test_input_codes_at_the_edges():
    corners = verify.corner_cases().charges
    codes = golden.IntegerEncoder.input_codes(corners)
    assert codes.shape == (len(corners), 9, 9) and codes.dtype == np.int64
    assert codes.min() == 0 and codes.max() == 256
    assert np.all(codes[:, 8, :] == 0) and np.all(codes[:, :, 8] == 0)  # padding row and column
    one_hot = golden.IntegerEncoder.input_codes(np.eye(chip.N_TC, dtype=np.int64) * 3)  # one TC hit, every TC
    assert np.array_equal(chip.image_to_tc(one_hot), np.eye(chip.N_TC) * 256)
    two = np.zeros((1, chip.N_TC), np.int64)
    two[0, :2] = [1, 255]
    assert chip.image_to_tc(golden.IntegerEncoder.input_codes(two))[0, :2].tolist() == [1, 255]  # smallest step
    full = golden.IntegerEncoder.input_codes(np.full((2, chip.N_TC), chip.CHARGE_MAX))
    beyond = golden.IntegerEncoder.input_codes(np.full((1, chip.N_TC), chip.CHARGE_MAX + 1))
    assert np.all(chip.image_to_tc(full) == 256) and np.array_equal(full[:1], beyond)  # clip, don't wrap
    uniform = golden.IntegerEncoder.input_codes(np.full((1, chip.N_TC), 35))
    assert np.all(chip.image_to_tc(uniform) == 256 // chip.N_TC)


# ----------------------------------------------------------------------------- golden = QKeras


@pytest.mark.slow
@pytest.mark.parametrize("fixture, bits", [("calq_run", 9), ("calq_run_3bit", 3)])
def test_golden_equals_qkeras_on_trained_encoders(request, real_charges, fixture, bits):
    from ecqae import train

    run = train.load_run(request.getfixturevalue(fixture))
    enc = golden.IntegerEncoder.from_keras(run.encoder())
    assert enc.latent_bits == bits
    test_split = run.test_wafers().charges.astype(np.int64)
    charges = np.concatenate([real_charges, test_split])
    assert len(charges) >= 10_000
    want = qkeras_codes(run.encoder(), charges, enc.latent_scale)
    got = enc.latent_codes(charges)
    mismatched = int(np.sum(np.any(got != want, axis=1)))
    assert mismatched == 0, f"{mismatched} of {len(charges)} wafers differ"
    assert got.max() > 0, "a dead encoder would make this comparison empty"
    # the output word carries exactly these codes
    back = golden.unpack_output_word(enc.output_words(charges[:500]), bits)
    assert np.array_equal(back.latents, got[:500])


@pytest.mark.slow
@pytest.mark.parametrize("elinks, seed, bias_shift", [(2, 1, 8), (3, 2, 0), (4, 3, 4), (5, 4, 0), (5, 5, 16)])
def test_golden_equals_qkeras_on_random_weights(real_charges, elinks, seed, bias_shift, monkeypatch):
    keras_enc = random_encoder(elinks, seed, bias_shift)
    enc = golden.IntegerEncoder.from_keras(keras_enc)
    assert enc.latent_bits == chip.latent_bits_for_elinks(elinks)
    want = qkeras_codes(keras_enc, real_charges, enc.latent_scale)
    got = enc.latent_codes(real_charges)
    assert int(np.sum(got != want)) == 0
    conv_ties, latent_ties = tie_counts(enc, real_charges)
    assert conv_ties > 100 and latent_ties > 0, (conv_ties, latent_ties)
    assert 0 < np.mean(got == (1 << enc.latent_bits) - 1) < 1 or np.mean(got == 0) > 0  # saturation/zero reached

    # The comparison has teeth: rounding ties up instead of to even is caught.
    def half_up(acc, shift):
        acc = np.asarray(acc, dtype=np.int64)
        return acc << -shift if shift <= 0 else (acc + (1 << (shift - 1))) >> shift

    monkeypatch.setattr(golden, "round_shift", half_up)
    assert int(np.sum(enc.latent_codes(real_charges) != want)) > 0


@pytest.mark.slow
def test_from_keras_refuses_weights_the_registers_cannot_hold():
    from ecqae import model

    enc = model.build_encoder(ModelConfig(quant=QuantConfig(weight_bits=7)))
    with pytest.raises(EcqaeError, match="registers hold"):
        golden.IntegerEncoder.from_keras(enc)


def test_golden_imports_no_training_framework(tmp_path):
    """The golden model, its register image and output words run without TensorFlow, Keras or hls4ml."""
    script = f"""
import json, sys
import numpy as np
from ecqae import golden
from ecqae.config import QuantConfig
rng = np.random.default_rng(0)
enc = golden.IntegerEncoder.from_register_codes(QuantConfig(latent_bits=9), rng.integers(-32, 32, 2144))
golden.write_register_image(enc, {str(tmp_path / "r.hex")!r})
back = golden.read_register_image({str(tmp_path / "r.hex")!r})
words = back.output_words(rng.integers(0, 1 << 22, (500, 48)))
print(json.dumps({{"n": len(words), "mods": sorted(m for m in sys.modules
      if m.split(".")[0] in ("tensorflow", "keras", "qkeras", "hls4ml", "tf_keras"))}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 500
    assert result["mods"] == []


# ----------------------------------------------------------------------------- register image


def random_golden(latent_bits: int = 9, seed: int = 0) -> golden.IntegerEncoder:
    rng = np.random.default_rng(seed)
    codes = rng.integers(chip.WEIGHT_CODE_MIN, chip.WEIGHT_CODE_MAX + 1, chip.N_REGISTER_WORDS)
    codes[:2] = [chip.WEIGHT_CODE_MIN, chip.WEIGHT_CODE_MAX]  # both ends of the register range
    return golden.IntegerEncoder.from_register_codes(QuantConfig(latent_bits=latent_bits), codes)


@pytest.mark.parametrize("latent_bits", [3, 5, 7, 9])
def test_register_image_round_trip(tmp_path, latent_bits):
    enc = random_golden(latent_bits, seed=latent_bits)
    hex_path, csv_path = tmp_path / "regs.hex", tmp_path / "regs.csv"
    golden.write_register_image(enc, hex_path, csv_path)
    words = [ln for ln in hex_path.read_text().splitlines() if not ln.startswith("//")]
    assert len(words) == 2144 == chip.N_REGISTER_WORDS
    assert words[:2] == ["20", "1F"]  # -32 and +31 in 6-bit two's complement
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "word,layer,tensor,index,value,code,hex"
    assert rows[1] == "0,conv2d,kernel,0,-1.0,-32,20" and rows[2] == "1,conv2d,kernel,1,0.96875,31,1F"
    assert rows[73].startswith("72,conv2d,bias,0,") and rows[81].startswith("80,dense,kernel,0,")
    assert rows[2129].startswith("2128,dense,bias,0,") and len(rows) == 2145

    charges = np.concatenate([verify.corner_cases().charges, data.read_csv(CALQ, eta="2.2", max_rows=2000).charges])
    want = enc.latent_codes(charges)
    for back in (golden.read_register_image(hex_path), golden.read_register_image(csv_path, enc.quant)):
        assert np.array_equal(back.register_codes(), enc.register_codes())
        assert back.quant == enc.quant
        assert np.array_equal(back.latent_codes(charges), want)


def test_register_layout_matches_keras_weight_order():
    from ecqae import model

    enc = model.build_encoder(ModelConfig())
    shapes = tuple(tuple(w.shape) for w in enc.get_weights())
    assert shapes == tuple(shape for _, _, shape in chip.REGISTER_LAYOUT)


@pytest.mark.parametrize(
    "tensor, index, position, value, problem",
    [
        (0, 17, "0,2,0,1", 1.0, "outside -1 ... 31/32"),
        (1, 3, "3", -1.03125, "outside -1 ... 31/32"),
        (2, 2000, "125,0", 0.01, "off the 1/32 grid"),
        (3, 15, "15", float("nan"), "outside -1 ... 31/32"),
    ],
)
def test_unrepresentable_weight_names_layer_and_index(tmp_path, tensor, index, position, value, problem):
    enc = random_golden()
    layer, name, _ = chip.REGISTER_LAYOUT[tensor]
    values = [getattr(enc, t) / 32 for t in golden.TENSORS]
    values[tensor].reshape(-1)[index] = value
    with pytest.raises(EcqaeError, match=rf"^weights: {layer} {name} index {index} \[{position}\] = .*{problem}"):
        golden.IntegerEncoder.from_values(enc.quant, values)

    # the same value in a hand-edited CSV register image
    csv_path = tmp_path / "regs.csv"
    golden.write_register_image(enc, tmp_path / "regs.hex", csv_path)
    word = sum(int(np.prod(s)) for _, _, s in chip.REGISTER_LAYOUT[:tensor]) + index
    rows = csv_path.read_text().splitlines()
    cells = rows[word + 1].split(",")
    cells[4] = repr(value)
    rows[word + 1] = ",".join(cells)
    csv_path.write_text("\n".join(rows) + "\n")
    with pytest.raises(EcqaeError, match=f"regs.csv: line {word + 2}: {layer} {name} index {index} = .*{problem}"):
        golden.read_register_image(csv_path, enc.quant)


def test_register_hex_errors(tmp_path):
    enc = random_golden()
    path = tmp_path / "regs.hex"
    golden.write_register_image(enc, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(EcqaeError, match="regs.hex: 2143 register words, expected 2144"):
        golden.read_register_image(path)
    bad = list(lines)
    bad[3 + 80] = "7F"  # first dense kernel word: 7 bits
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(EcqaeError, match="line 84: word 7F \\(dense kernel index 0\\) does not fit 6 bits"):
        golden.read_register_image(path)
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(EcqaeError, match="no '// quant:' line"):
        golden.read_register_image(path)
    assert golden.read_register_image(path, enc.quant).quant == enc.quant  # widths given instead
    golden.write_register_image(enc, path)
    with pytest.raises(EcqaeError, match="quant line says .*latent_bits=9.*, expected .*latent_bits=3"):
        golden.read_register_image(path, QuantConfig(latent_bits=3))


# ----------------------------------------------------------------------------- output word


@pytest.mark.parametrize("elinks", [2, 3, 4, 5])
def test_output_word_round_trip(elinks):
    bits = chip.latent_bits_for_elinks(elinks)
    rng = np.random.default_rng(elinks)
    n = 2000
    latents = rng.integers(0, 1 << bits, size=(n, chip.N_LATENT))
    latents[0], latents[1] = 0, (1 << bits) - 1
    sums = chip.encode_sum(rng.integers(0, chip.CHARGE_MAX + 2, n))
    sums[:2] = [0, (1 << chip.SUM_WORD_BITS) - 1]
    words = golden.pack_output_word(latents, sums, bits)
    digits = -(-(chip.N_LATENT * bits + chip.SUM_WORD_BITS) // 4)
    assert all(len(w) == digits for w in words)
    assert words[0] == "0" * digits
    back = golden.unpack_output_word(words, bits)
    assert np.array_equal(back.latents, latents) and np.array_equal(back.sum_word, sums)
    assert np.array_equal(back.sum_decoded, chip.decode_sum(sums))
    # fits the e-link budget with the header
    assert chip.output_word_bits(bits) + chip.HEADER_BITS <= chip.ELINK_BITS * elinks


def test_output_word_bit_order_for_9_bit_latents():
    latents = np.zeros((3, 16), np.int64)
    latents[0, 0] = 1  # latent 0 in the lowest bits
    latents[1, 15] = 0x1FF  # latent 15 just below the sum
    words = golden.pack_output_word(latents, np.array([0, 0, 0x1FF]), 9)
    assert chip.output_word_hex_digits(9) == 39
    assert words[0] == "0" * 38 + "1"
    assert int(words[1], 16) == 0x1FF << 135
    assert int(words[2], 16) == 0x1FF << 144 and words[2].startswith("1FF")  # 153 bits: top digit holds one bit
    assert golden.unpack_output_word(words[2], 9).sum_decoded.tolist() == [int(chip.decode_sum(0x1FF))]


def test_output_word_unpack_errors():
    with pytest.raises(EcqaeError, match="output word 0: 'ABC' is not 39 hex digits"):
        golden.unpack_output_word(["ABC"], 9)
    with pytest.raises(EcqaeError, match="bits set above bit 152"):
        golden.unpack_output_word(["8" + "0" * 38], 9)
    with pytest.raises(ValueError, match="3-bit unsigned"):
        golden.pack_output_word(np.full((1, 16), 8), np.array([0]), 3)
