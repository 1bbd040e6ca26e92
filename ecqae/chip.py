"""ECON-T facts the whole pipeline depends on: one source of truth.

Everything that is part of the contract between the chip, the firmware and the
decoder lives here (TC geometry, bit widths, the e-link table, the encoded sum,
the encoder's input grid). Other modules import these; none repeats them.
"""

from __future__ import annotations

import numpy as np

N_TC = 48
N_SECTORS = 3
TC_PER_SECTOR = 16
IMAGE_SIZE = 9  # the encoder's input is 9x9x1

CHARGE_BITS = 22
CHARGE_MAX = (1 << CHARGE_BITS) - 1
MIP_T = 35  # ECON-T input counts per transverse MIP

# Encoder input grid: charge / wafer sum, floored onto 8 fractional bits.
# The value 1.0 (a single-TC wafer) must be representable: ufixed<9,1>.
INPUT_FRAC_BITS = 8
INPUT_BITS = INPUT_FRAC_BITS + 1

# 6-bit I2C weight registers: sign + 5 fractional bits, values k/32, k in -32..31.
WEIGHT_BITS = 6
WEIGHT_INTEGER = 0

# Encoded charge sum: 9-bit float, 5 exponent bits and 4 mantissa bits.
SUM_EXP_BITS = 5
SUM_MANT_BITS = 4
SUM_WORD_BITS = SUM_EXP_BITS + SUM_MANT_BITS
N_LATENT = 16
ELINK_BITS = 32  # per e-link per bunch crossing
HEADER_BITS = 4

# Latent bits per latent value, by number of e-links (reference §4).
ELINK_LATENT_BITS = {2: 3, 3: 5, 4: 7, 5: 9}
MAX_ELINKS = 14
# Best-choice format: TCs (address + charge) that fit each e-link budget (reference §6).
BEST_CHOICE_N = {2: 4, 3: 6, 4: 9, 5: 14}


def latent_bits_for_elinks(elinks: int) -> int:
    """Bits per latent for an e-link budget; 5 or more links give 9 bits."""
    if not isinstance(elinks, int) or elinks < 2 or elinks > MAX_ELINKS:
        raise ValueError(f"elinks must be an integer in 2..{MAX_ELINKS}, got {elinks!r}")
    return ELINK_LATENT_BITS[min(elinks, 5)]


# Standard 8x8 arrangement (reference §2): entry = TC index, -1 = duplicated
# TC that the mask zeroes.
LAYOUT_8X8 = np.array(
    [
        [28, 29, 30, 31, 0, 4, 8, 12],
        [24, 25, 26, 27, 1, 5, 9, 13],
        [20, 21, 22, 23, 2, 6, 10, 14],
        [16, 17, 18, 19, 3, 7, 11, 15],
        [47, 43, 39, 35, -1, -1, -1, -1],
        [46, 42, 38, 34, -1, -1, -1, -1],
        [45, 41, 37, 33, -1, -1, -1, -1],
        [44, 40, 36, 32, -1, -1, -1, -1],
    ],
    dtype=np.int64,
)


def _image_positions() -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the 9x9 image of each TC, derived from the 8x8 layout.

    The 9x9 image is the 8x8 one with a zero row below and a zero column to the
    right, so positions carry over unchanged.
    """
    rows = np.empty(N_TC, dtype=np.int64)
    cols = np.empty(N_TC, dtype=np.int64)
    for r in range(8):
        for c in range(8):
            tc = LAYOUT_8X8[r, c]
            if tc >= 0:
                rows[tc], cols[tc] = r, c
    return rows, cols


TC_ROW, TC_COL = _image_positions()
TC_FLAT_INDEX = TC_ROW * IMAGE_SIZE + TC_COL  # index into a flattened 9x9 image


def tc_to_image(tc: np.ndarray) -> np.ndarray:
    """(N, 48) TC values -> (N, 9, 9, 1) encoder images (padding and mask are zero)."""
    tc = np.asarray(tc)
    flat = np.zeros((tc.shape[0], IMAGE_SIZE * IMAGE_SIZE), dtype=tc.dtype)
    flat[:, TC_FLAT_INDEX] = tc
    return flat.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)


def image_to_tc(image: np.ndarray) -> np.ndarray:
    """(N, 9, 9[, 1]) images -> (N, 48) TC values; inverse of tc_to_image."""
    image = np.asarray(image)
    return image.reshape(image.shape[0], -1)[:, TC_FLAT_INDEX]


# TC centres (cm). Sector 0 is a rhombic lattice; sectors 1 and 2 are it
# rotated by 120 and 240 degrees about the wafer centre, with the same (a, b)
# indexing (tc = 16*sector + 4*a + b).
_PITCH_Y = 2.4168015
_PITCH_X = 2.09301


def _tc_coordinates() -> np.ndarray:
    a, b = np.divmod(np.arange(TC_PER_SECTOR), 4)
    sector0 = np.stack([a * _PITCH_X, -b * _PITCH_Y - a * _PITCH_Y / 2], axis=1)
    ang = 2 * np.pi / 3
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    # TC 16 (sector 1, a=b=0) is TC 0 rotated: p16 = c + R(0 - c) => (I - R) c = p16.
    p16 = np.array([-4 * _PITCH_X, -4.25 * _PITCH_Y])
    centre = np.linalg.solve(np.eye(2) - rot, p16)
    out = [sector0]
    r = np.eye(2)
    for _ in range(2):
        r = rot @ r
        out.append((sector0 - centre) @ r.T + centre)
    return np.concatenate(out)


TC_XY = _tc_coordinates()
# EMD ground distance unit: neighbouring TCs are 2 units apart.
EMD_COORD_SCALE = 1.0 / (0.5 * _PITCH_Y)
TC_SECTOR = np.arange(N_TC) // TC_PER_SECTOR

# Sensor thickness by |eta| (reference §3); boundaries used by the generator
# and by per-eta evaluation bins.
ETA_MIN, ETA_MAX = 1.5, 3.0
THICKNESS_EDGES = (1.5, 2.0, 2.5, 3.0)
THICKNESS_UM = (300, 200, 120)


def thickness_region(eta: np.ndarray) -> np.ndarray:
    """0, 1, 2 for 300, 200, 120 um silicon; out-of-range eta goes to the nearest region."""
    return np.clip(np.digitize(np.abs(eta), THICKNESS_EDGES[1:-1]), 0, 2)


def encode_sum(total: np.ndarray) -> np.ndarray:
    """22-bit charge sum -> 9-bit 5E4M word, as the chip transmits it.

    Below 2^5 the word is the value itself; above, exponent = bit length - 4 and
    the mantissa is the 4 bits after the leading one. Sums beyond 22 bits
    saturate the word to all ones.
    """
    v = np.asarray(total, dtype=np.int64)
    if np.any(v < 0):
        raise ValueError("charge sums must be non-negative")
    nbits = np.frexp(v.astype(np.float64))[1].astype(np.int64)  # bit length, exact below 2^53
    small = nbits <= SUM_MANT_BITS
    exp = np.where(small, 0, nbits - SUM_MANT_BITS)
    mant = np.where(small, v, (v >> np.maximum(nbits - SUM_MANT_BITS - 1, 0)) & 0xF)
    word = np.where(small, v, (exp << SUM_MANT_BITS) | mant)
    return np.where(v > CHARGE_MAX, (1 << SUM_WORD_BITS) - 1, word)


def decode_sum(word: np.ndarray) -> np.ndarray:
    """9-bit word -> the receiving side's estimate of the sum.

    The encoder drops the bits below the mantissa, so a word stands for an
    interval of sums; the estimate is its midpoint (flooring would bias every
    reconstructed energy low by ~2%). Sums below 2^5 come back exactly.
    """
    w = np.asarray(word, dtype=np.int64)
    if np.any((w < 0) | (w >= 1 << SUM_WORD_BITS)):
        raise ValueError("sum words must be 9-bit unsigned integers")
    exp, mant = w >> SUM_MANT_BITS, w & 0xF
    shift = np.maximum(exp - 1, 0)
    lower = np.where(exp == 0, mant, (16 + mant) << shift)
    return lower + ((1 << shift) >> 1)


def normalise(charges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer charges (N, 48) -> (inputs on the encoder grid, 22-bit sums).

    x_i = floor(q_i * 2^8 / S) / 2^8, S the wafer sum saturated at 22 bits: an
    integer division the chip can do. An all-zero wafer gives all-zero inputs
    (and sum word 0), never a division by zero.
    """
    q = np.clip(np.asarray(charges, dtype=np.int64), 0, CHARGE_MAX)
    s = np.minimum(q.sum(axis=1), CHARGE_MAX)
    scale = 1 << INPUT_FRAC_BITS
    num = q * scale
    x = np.where(s[:, None] > 0, num // np.maximum(s, 1)[:, None], 0)
    x = np.minimum(x, scale)  # a saturated sum can put a TC above 1.0
    return (x / scale).astype(np.float32), s


# Encoder geometry the register image and the golden model are laid out on
# (model.check_encoder refuses any other): 3x3 stride-2 'valid' conv, 8 filters,
# 9x9 -> 4x4x8, flattened channels-last (index (row*4 + col)*8 + filter), dense to 16.
CONV_FILTERS = 8
CONV_KERNEL = 3
CONV_STRIDE = 2
CONV_OUT = (IMAGE_SIZE - CONV_KERNEL) // CONV_STRIDE + 1
DENSE_INPUTS = CONV_OUT * CONV_OUT * CONV_FILTERS

# Register image: every weight and bias as one 6-bit two's-complement word
# (value = code / 32), in this order, each tensor in C order (last index fastest).
REGISTER_LAYOUT: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("conv2d", "kernel", (CONV_KERNEL, CONV_KERNEL, 1, CONV_FILTERS)),  # [row, col, channel, filter]
    ("conv2d", "bias", (CONV_FILTERS,)),
    ("dense", "kernel", (DENSE_INPUTS, N_LATENT)),  # [flattened conv output, latent]
    ("dense", "bias", (N_LATENT,)),
)
N_REGISTER_WORDS = sum(int(np.prod(shape)) for _, _, shape in REGISTER_LAYOUT)  # 2,144
WEIGHT_FRAC_BITS = WEIGHT_BITS - 1 - WEIGHT_INTEGER
WEIGHT_CODE_MIN = -(1 << (WEIGHT_BITS - 1))
WEIGHT_CODE_MAX = (1 << (WEIGHT_BITS - 1)) - 1

# Output word: the 16 latent codes (value * 2^(bits - integer), unsigned) and the
# 9-bit encoded sum as one unsigned integer of 16*b + 9 bits, b the latent width.
# Bit 0 is the least significant: latent i occupies bits [i*b, (i+1)*b), the sum
# word the 9 bits above latent 15, i.e. Verilog {sum_word, latent[15], ..., latent[0]}.
# Written as hex, most significant digit first, zero-padded to whole digits
# (9-bit latents: 153 bits, 39 digits).


def output_word_bits(latent_bits: int) -> int:
    return N_LATENT * latent_bits + SUM_WORD_BITS


def output_word_hex_digits(latent_bits: int) -> int:
    return -(-output_word_bits(latent_bits) // 4)


def output_latent_lsb(index: int, latent_bits: int) -> int:
    """Bit position of latent ``index``'s least significant bit in the output word."""
    return index * latent_bits


def output_sum_lsb(latent_bits: int) -> int:
    """Bit position of the encoded sum's least significant bit in the output word."""
    return N_LATENT * latent_bits
