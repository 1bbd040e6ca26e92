"""Golden integer model of the on-chip encoder, its register image and its output word.

The encoder re-done in integer numpy arithmetic, with no training framework in
between: what an ASIC engineer can read line by line and check the RTL
against. It imports neither TensorFlow nor hls4ml (only ``from_keras`` touches a
Keras model, through the model's own quantizers), and equals the QKeras
forward pass and the C simulation bit for bit.

Every value is an integer code on a fixed grid (Q = QuantConfig, b = latent bits):

  input      x = floor(q * 2^8 / S)           ufixed<9,1>, grid 2^-8 (chip.normalise), 0..256
  weights    w = k, k in -32..31               quantized_bits(6,0,alpha=1), grid 2^-5
  conv acc   a[r,c,f] = sum_{i,j} x[2r+i, 2c+j] * w[i,j,0,f] + (bias[f] << 8)        grid 2^-13, int64
  conv act   h = clip(round_half_even(a / 2^6), 0, 255)   quantized_relu(8,1), grid 2^-7
  dense acc  d[u] = sum_n h[n] * W[n,u] + (B[u] << 7)     n = (r*4 + c)*8 + f, grid 2^-12
  latent     z = clip(round_half_even(d / 2^(12 - (b - 1))), 0, 2^b - 1)   quantized_relu(b,1)

(the shifts follow Q's widths; these are the defaults). Rounding is half to
even because QKeras rounds with ``tf.round``; saturation is the quantizers'
clip. QKeras computes in float32, which is exact here because every
accumulator fits in 24 bits (conv < 2^17, dense <= 2^20).

Register image: the 2,144 weights and biases as 6-bit two's-complement words
(sign + 5 fractional bits, value = code / 32, word = code & 0x3F), in this
order, each tensor in C order (last index fastest):

  words    0 ..   71  conv2d kernel [row 0..2, col 0..2, channel 0, filter 0..7]
  words   72 ..   79  conv2d bias   [filter 0..7]
  words   80 .. 2127  dense kernel  [input n 0..127, latent 0..15], n = (r*4 + c)*8 + f
  words 2128 .. 2143  dense bias    [latent 0..15]

``.hex``: one word per line, two hex digits, after ``//`` comment lines (Verilog
``$readmemh`` skips them) that state the order and the activation widths.
``.csv``: word, layer, tensor, index (flat, within the tensor), value, code, hex.

Output word (layout constants in ``chip``): latent i in bits [i*b, (i+1)*b),
the 9-bit encoded sum above latent 15, i.e. {sum_word, latent[15], ..., latent[0]},
as hex, most significant digit first (9-bit latents: 153 bits, 39 digits).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import artifacts, chip
from .config import QuantConfig
from .errors import EcqaeError

TENSORS = ("conv_kernel", "conv_bias", "dense_kernel", "dense_bias")  # IntegerEncoder fields, register order
CSV_COLUMNS = ("word", "layer", "tensor", "index", "value", "code", "hex")
_WORD_MASK = (1 << chip.WEIGHT_BITS) - 1
_QUANT_KEYS = ("conv_act_bits", "conv_act_integer", "latent_bits", "latent_integer")


# ----------------------------------------------------------------------------- arithmetic


def round_shift(acc: np.ndarray, shift: int) -> np.ndarray:
    """acc / 2^shift rounded half to even (what tf.round does), in integers only."""
    acc = np.asarray(acc, dtype=np.int64)
    if shift <= 0:
        return acc << -shift
    floor = acc >> shift  # arithmetic shift: floor division, also for negatives
    rem = acc - (floor << shift)
    half = np.int64(1) << (shift - 1)
    up = (rem > half) | ((rem == half) & ((floor & 1) == 1))
    return floor + up


def relu_codes(acc: np.ndarray, acc_frac: int, bits: int, integer: int) -> np.ndarray:
    """quantized_relu(bits, integer) of acc * 2^-acc_frac, as codes on its 2^(integer-bits) grid.

    QKeras: xq = 2^i * clip(round(x * 2^b / 2^i) / 2^b, 0, 1 - 2^-b), i.e. the code
    round_half_even(x * 2^(b-i)) saturated to 0 .. 2^b - 1.
    """
    code = round_shift(acc, acc_frac - (bits - integer))
    return np.clip(code, 0, (1 << bits) - 1)


def _position(shape: tuple[int, ...], flat: int) -> str:
    return ",".join(str(int(i)) for i in np.unravel_index(flat, shape))


def _value_problem(value: float) -> str | None:
    """Why a weight value cannot go into a register, or None if it can."""
    s = value * (1 << chip.WEIGHT_FRAC_BITS)
    if not np.isfinite(s) or s < chip.WEIGHT_CODE_MIN or s > chip.WEIGHT_CODE_MAX:
        return f"is outside -1 ... 31/32, not representable in the {chip.WEIGHT_BITS}-bit weight register"
    if s != np.floor(s):
        return f"is off the 1/{1 << chip.WEIGHT_FRAC_BITS} grid of the {chip.WEIGHT_BITS}-bit weight register"
    return None


def weight_codes(values: np.ndarray, layer: str, tensor: str, where: str) -> np.ndarray:
    """Float weights -> signed 6-bit codes; off-grid or out-of-range values are errors naming layer and index."""
    v = np.asarray(values, dtype=np.float64)
    scaled = v * (1 << chip.WEIGHT_FRAC_BITS)
    flat = scaled.reshape(-1)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flat) | (flat < chip.WEIGHT_CODE_MIN) | (flat > chip.WEIGHT_CODE_MAX)
        bad |= flat != np.floor(flat)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = float(v.reshape(-1)[i])
        raise EcqaeError(
            f"{where}: {layer} {tensor} index {i} [{_position(v.shape, i)}] = {value!r} {_value_problem(value)}"
        )
    return scaled.astype(np.int64)


# ----------------------------------------------------------------------------- the model


def _check_quant(q: QuantConfig, where: str) -> None:
    if (q.weight_bits, q.weight_integer) != (chip.WEIGHT_BITS, chip.WEIGHT_INTEGER):
        raise EcqaeError(
            f"{where}: weights are quantized_bits({q.weight_bits},{q.weight_integer}); the chip's registers hold "
            f"quantized_bits({chip.WEIGHT_BITS},{chip.WEIGHT_INTEGER},alpha=1)"
        )
    if q.latent_bits is None:
        raise EcqaeError(f"{where}: latent_bits must be resolved (an integer), not None")


@dataclass(frozen=True, eq=False)
class IntegerEncoder:
    """The encoder as integers: quantizer widths and signed 6-bit weight codes (value = code / 32)."""

    quant: QuantConfig
    conv_kernel: np.ndarray  # (3, 3, 1, 8)
    conv_bias: np.ndarray  # (8,)
    dense_kernel: np.ndarray  # (128, 16)
    dense_bias: np.ndarray  # (16,)

    def __post_init__(self) -> None:
        _check_quant(self.quant, "encoder")
        for name, (layer, tensor, shape) in zip(TENSORS, chip.REGISTER_LAYOUT, strict=True):
            codes = np.asarray(getattr(self, name))
            if codes.shape != shape:
                raise EcqaeError(f"{layer} {tensor}: shape {codes.shape}, expected {shape}")
            if not np.issubdtype(codes.dtype, np.integer):
                raise EcqaeError(f"{layer} {tensor}: codes must be integers, got {codes.dtype}")
            bad = np.flatnonzero((codes < chip.WEIGHT_CODE_MIN) | (codes > chip.WEIGHT_CODE_MAX))
            if bad.size:
                i = int(bad[0])
                raise EcqaeError(
                    f"{layer} {tensor} index {i} [{_position(shape, i)}]: code {int(codes.reshape(-1)[i])} "
                    f"outside {chip.WEIGHT_CODE_MIN}..{chip.WEIGHT_CODE_MAX}"
                )
            object.__setattr__(self, name, codes.astype(np.int64))

    # ---- construction

    @classmethod
    def from_values(cls, quant: QuantConfig, values: Sequence[np.ndarray], where: str = "weights") -> IntegerEncoder:
        """From float weights in register order (conv kernel, conv bias, dense kernel, dense bias)."""
        _check_quant(quant, where)
        if len(values) != len(TENSORS):
            raise EcqaeError(f"{where}: {len(values)} weight tensors, expected {len(TENSORS)}")
        codes = {}
        for name, (layer, tensor, shape), v in zip(TENSORS, chip.REGISTER_LAYOUT, values, strict=True):
            if np.shape(v) != shape:
                raise EcqaeError(f"{where}: {layer} {tensor} has shape {np.shape(v)}, expected {shape}")
            codes[name] = weight_codes(v, layer, tensor, where)
        return cls(quant=quant, **codes)

    @classmethod
    def from_keras(cls, encoder: Any, where: str = "encoder") -> IntegerEncoder:
        """Read a QKeras encoder: each weight through its layer's own quantizer, then to integer codes.

        The only function here that touches Keras (imported lazily). The
        quantized values must land on the register grid; anything else is refused.
        """
        from . import model as mdl

        quant = mdl.check_encoder(encoder, where)
        conv, dense = encoder.layers[1], encoder.layers[4]
        values = []
        for layer in (conv, dense):
            act = getattr(layer, "activation", None)
            if act is not None and getattr(act, "__name__", str(act)) != "linear":
                raise EcqaeError(f"{where}: layer '{layer.name}' has activation {act}, expected none (linear)")
            values.append(np.asarray(layer.kernel_quantizer_internal(layer.kernel)))
            values.append(np.asarray(layer.bias_quantizer_internal(layer.bias)))
        return cls.from_values(quant, values, where)

    # ---- forward pass

    @property
    def latent_bits(self) -> int:
        assert self.quant.latent_bits is not None
        return self.quant.latent_bits

    @property
    def latent_scale(self) -> int:
        """Latent code = latent value * latent_scale (the chip sends the code)."""
        return 1 << (self.latent_bits - self.quant.latent_integer)

    @staticmethod
    def input_codes(charges: np.ndarray) -> np.ndarray:
        """Integer charges (N, 48) -> encoder input codes (N, 9, 9) on the 2^-8 grid (0..256)."""
        q = np.asarray(charges)
        if q.ndim != 2 or q.shape[1] != chip.N_TC:
            raise EcqaeError(f"charges: shape {q.shape}, expected (N, {chip.N_TC})")
        x, _ = chip.normalise(q)
        codes = np.rint(x.astype(np.float64) * (1 << chip.INPUT_FRAC_BITS)).astype(np.int64)
        return chip.tc_to_image(codes)[..., 0]

    def accumulators(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(conv accumulator (N,4,4,8), conv activation codes (N,4,4,8), dense accumulator (N,16)), int64."""
        x = np.asarray(codes, dtype=np.int64)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3 or x.shape[1:] != (chip.IMAGE_SIZE, chip.IMAGE_SIZE):
            raise EcqaeError(f"input codes: shape {x.shape}, expected (N, 9, 9)")
        q, k, s, o = self.quant, chip.CONV_KERNEL, chip.CONV_STRIDE, chip.CONV_OUT
        span = s * (o - 1) + 1
        conv = np.zeros((x.shape[0], o, o, chip.CONV_FILTERS), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                conv += x[:, i : i + span : s, j : j + span : s, None] * self.conv_kernel[i, j, 0]
        conv += self.conv_bias << chip.INPUT_FRAC_BITS  # bias onto the 2^-(8+5) accumulator grid
        conv_frac = chip.INPUT_FRAC_BITS + chip.WEIGHT_FRAC_BITS
        act = relu_codes(conv, conv_frac, q.conv_act_bits, q.conv_act_integer)
        act_frac = q.conv_act_bits - q.conv_act_integer
        flat = act.reshape(x.shape[0], chip.DENSE_INPUTS)  # channels-last flatten, as Keras Flatten
        dense = flat @ self.dense_kernel + (self.dense_bias << act_frac)
        return conv, act, dense

    def forward(self, codes: np.ndarray) -> np.ndarray:
        """Input codes (N, 9, 9) -> latent codes (N, 16), int64."""
        _, _, dense = self.accumulators(codes)
        q = self.quant
        dense_frac = q.conv_act_bits - q.conv_act_integer + chip.WEIGHT_FRAC_BITS
        return relu_codes(dense, dense_frac, self.latent_bits, q.latent_integer)

    CHUNK = 16384  # wafers per step: int64 temporaries stay ~100 MB at any dataset size

    def latent_codes(self, charges: np.ndarray) -> np.ndarray:
        """Integer charges (N, 48) -> the latent codes the chip sends (N, 16), int64."""
        q = np.asarray(charges)
        if len(q) <= self.CHUNK:
            return self.forward(self.input_codes(q))
        return np.concatenate(
            [self.forward(self.input_codes(q[i : i + self.CHUNK])) for i in range(0, len(q), self.CHUNK)]
        )

    def latent_values(self, charges: np.ndarray) -> np.ndarray:
        """Latent values as QKeras outputs them (float32, exact)."""
        return (self.latent_codes(charges) / self.latent_scale).astype(np.float32)

    def output_words(self, charges: np.ndarray) -> list[str]:
        """The chip's output words (hex) for integer charges (N, 48)."""
        _, total = chip.normalise(charges)
        return pack_output_word(self.latent_codes(charges), chip.encode_sum(total), self.latent_bits)

    # ---- register image

    def register_codes(self) -> np.ndarray:
        """All 2,144 signed codes in register order."""
        return np.concatenate([getattr(self, name).reshape(-1) for name in TENSORS])

    def register_words(self) -> np.ndarray:
        """All 2,144 register words (6-bit two's complement, 0..63) in register order."""
        return self.register_codes() & _WORD_MASK

    @classmethod
    def from_register_codes(
        cls, quant: QuantConfig, codes: np.ndarray, where: str = "register image"
    ) -> IntegerEncoder:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (chip.N_REGISTER_WORDS,):
            raise EcqaeError(f"{where}: {codes.size} words, expected {chip.N_REGISTER_WORDS}")
        parts, start = {}, 0
        for name, (_, _, shape) in zip(TENSORS, chip.REGISTER_LAYOUT, strict=True):
            n = int(np.prod(shape))
            parts[name] = codes[start : start + n].reshape(shape)
            start += n
        return cls(quant=quant, **parts)


# ----------------------------------------------------------------------------- register image files


def _register_rows() -> list[tuple[str, str, int]]:
    """(layer, tensor, flat index) of every register word, in order."""
    return [(layer, tensor, i) for layer, tensor, shape in chip.REGISTER_LAYOUT for i in range(int(np.prod(shape)))]


def _quant_line(quant: QuantConfig) -> str:
    return " ".join(f"{k}={getattr(quant, k)}" for k in _QUANT_KEYS)


def register_hex(enc: IntegerEncoder) -> str:
    """The register image as text: '//' header lines, then one two-digit hex word per line."""
    order = " ".join(f"{layer}.{tensor}[{','.join(map(str, shape))}]" for layer, tensor, shape in chip.REGISTER_LAYOUT)
    lines = [
        f"// ecqae register image: {chip.N_REGISTER_WORDS} words, one per line, "
        f"{chip.WEIGHT_BITS}-bit two's complement, value = signed code / {1 << chip.WEIGHT_FRAC_BITS}",
        f"// order: {order} (C order, last index fastest)",
        f"// quant: {_quant_line(enc.quant)}",
    ]
    lines += [f"{int(w):02X}" for w in enc.register_words()]
    return "\n".join(lines) + "\n"


def register_csv(enc: IntegerEncoder) -> str:
    """The register image as a table an engineer can read: one row per word."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    codes, words = enc.register_codes(), enc.register_words()
    for n, (layer, tensor, i) in enumerate(_register_rows()):
        code = int(codes[n])
        w.writerow((n, layer, tensor, i, repr(code / (1 << chip.WEIGHT_FRAC_BITS)), code, f"{int(words[n]):02X}"))
    return buf.getvalue()


def write_register_image(enc: IntegerEncoder, hex_path: str | Path, csv_path: str | Path | None = None) -> None:
    """Write the .hex (and optionally the .csv) register image atomically."""
    artifacts.write_text(hex_path, register_hex(enc))
    if csv_path is not None:
        artifacts.write_text(csv_path, register_csv(enc))


def _parse_quant(text: str, where: str) -> QuantConfig:
    fields: dict[str, int] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or key not in _QUANT_KEYS or not re.fullmatch(r"\d+", value):
            raise EcqaeError(f"{where}: bad quant entry {item!r} (expected {' '.join(k + '=N' for k in _QUANT_KEYS)})")
        fields[key] = int(value)
    missing = [k for k in _QUANT_KEYS if k not in fields]
    if missing:
        raise EcqaeError(f"{where}: quant line lacks {', '.join(missing)}")
    try:
        return QuantConfig(**fields)
    except ValueError as exc:
        raise EcqaeError(f"{where}: {exc}") from None


def _read_hex(path: Path, text: str) -> tuple[QuantConfig | None, np.ndarray]:
    quant, words = None, []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("//"):
            m = re.match(r"//\s*quant:(.*)$", line)
            if m:
                quant = _parse_quant(m.group(1), f"{path}: line {lineno}")
            continue
        if not re.fullmatch(r"[0-9A-Fa-f]{1,2}", line):
            raise EcqaeError(f"{path}: line {lineno}: {line!r} is not a hex register word")
        word = int(line, 16)
        if word > _WORD_MASK:
            layer, tensor, i = _register_rows()[len(words)] if len(words) < chip.N_REGISTER_WORDS else ("?", "?", -1)
            raise EcqaeError(
                f"{path}: line {lineno}: word {line} ({layer} {tensor} index {i}) does not fit {chip.WEIGHT_BITS} bits"
            )
        words.append(word)
    if len(words) != chip.N_REGISTER_WORDS:
        raise EcqaeError(f"{path}: {len(words)} register words, expected {chip.N_REGISTER_WORDS}")
    w = np.array(words, dtype=np.int64)
    return quant, np.where(w > chip.WEIGHT_CODE_MAX, w - (1 << chip.WEIGHT_BITS), w)


def _read_csv(path: Path, text: str) -> np.ndarray:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != CSV_COLUMNS:
        raise EcqaeError(f"{path}: header must be {','.join(CSV_COLUMNS)}")
    expected = _register_rows()
    codes = []
    for n, row in enumerate(reader):
        line = n + 2
        if n >= chip.N_REGISTER_WORDS:
            raise EcqaeError(f"{path}: line {line}: more than {chip.N_REGISTER_WORDS} register words")
        if len(row) != len(CSV_COLUMNS):
            raise EcqaeError(f"{path}: line {line}: {len(row)} fields, expected {len(CSV_COLUMNS)}")
        word, layer, tensor, index, value, code, hexword = (c.strip() for c in row)
        e_layer, e_tensor, e_index = expected[n]
        if (word, layer, tensor, index) != (str(n), e_layer, e_tensor, str(e_index)):
            raise EcqaeError(
                f"{path}: line {line}: expected word {n} = {e_layer} {e_tensor} index {e_index}, "
                f"got {word} = {layer} {tensor} index {index}"
            )
        where = f"{path}: line {line}"
        try:
            v = float(value)
        except ValueError:
            raise EcqaeError(f"{where}: {layer} {tensor} index {index}: value {value!r} is not a number") from None
        problem = _value_problem(v)
        if problem:
            raise EcqaeError(f"{where}: {layer} {tensor} index {index} = {value} {problem}")
        c = int(v * (1 << chip.WEIGHT_FRAC_BITS))
        if code != str(c) or hexword.upper() != f"{c & _WORD_MASK:02X}":
            raise EcqaeError(
                f"{where}: {layer} {tensor} index {index}: code {code} / hex {hexword} disagree with value {value} "
                f"(code {c}, hex {c & _WORD_MASK:02X})"
            )
        codes.append(c)
    if len(codes) != chip.N_REGISTER_WORDS:
        raise EcqaeError(f"{path}: {len(codes)} register words, expected {chip.N_REGISTER_WORDS}")
    return np.array(codes, dtype=np.int64)


def read_register_image(path: str | Path, quant: QuantConfig | None = None) -> IntegerEncoder:
    """Rebuild the integer encoder from a register image (.hex, or .csv with ``quant`` given).

    The .hex states the activation widths on its ``// quant:`` line; a ``quant``
    passed in must agree with it. The .csv carries weights only.
    """
    p = Path(path)
    text = artifacts.read_text(p)
    if p.suffix.lower() == ".csv":
        if quant is None:
            raise EcqaeError(f"{p}: a .csv register image holds weights only; give the quantizer widths")
        return IntegerEncoder.from_register_codes(quant, _read_csv(p, text), str(p))
    stated, codes = _read_hex(p, text)
    if stated is None and quant is None:
        raise EcqaeError(f"{p}: no '// quant:' line stating the activation widths")
    if stated is not None and quant is not None:
        given = {k: getattr(quant, k) for k in _QUANT_KEYS}
        if {k: getattr(stated, k) for k in _QUANT_KEYS} != given:
            raise EcqaeError(f"{p}: quant line says {_quant_line(stated)}, expected {_quant_line(quant)}")
    base = stated if stated is not None else quant
    assert base is not None
    full = dataclasses.replace(base, weight_bits=chip.WEIGHT_BITS, weight_integer=chip.WEIGHT_INTEGER)
    return IntegerEncoder.from_register_codes(full, codes, str(p))


# ----------------------------------------------------------------------------- output word


class OutputWords(NamedTuple):
    """Unpacked output words: latent codes (N, 16), encoded sum words (N,), decoded sums (N,)."""

    latents: np.ndarray
    sum_word: np.ndarray
    sum_decoded: np.ndarray


def pack_output_word(latent_codes: np.ndarray, sum_word: np.ndarray, latent_bits: int) -> list[str]:
    """Latent codes (N, 16) and 9-bit sum words (N,) -> the chip's output words as hex strings."""
    z = np.asarray(latent_codes, dtype=np.int64)
    s = np.asarray(sum_word, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] != chip.N_LATENT or s.shape != (z.shape[0],):
        raise ValueError(f"expected latents (N, {chip.N_LATENT}) and sums (N,), got {z.shape} and {s.shape}")
    if np.any((z < 0) | (z >= 1 << latent_bits)):
        raise ValueError(f"latent codes must be {latent_bits}-bit unsigned integers")
    if np.any((s < 0) | (s >= 1 << chip.SUM_WORD_BITS)):
        raise ValueError(f"sum words must be {chip.SUM_WORD_BITS}-bit unsigned integers")
    digits = chip.output_word_hex_digits(latent_bits)
    shifts = [chip.output_latent_lsb(i, latent_bits) for i in range(chip.N_LATENT)]
    sum_lsb = chip.output_sum_lsb(latent_bits)
    out = []
    for row, total in zip(z.tolist(), s.tolist(), strict=True):
        v = total << sum_lsb
        for code, shift in zip(row, shifts, strict=True):
            v |= code << shift
        out.append(f"{v:0{digits}X}")
    return out


def unpack_output_word(words: Sequence[str] | str, latent_bits: int, where: str = "output word") -> OutputWords:
    """Hex output words -> (latent codes, sum words, decoded sums): the receiving side's view."""
    if isinstance(words, str):
        words = [words]
    digits = chip.output_word_hex_digits(latent_bits)
    nbits = chip.output_word_bits(latent_bits)
    sum_lsb = chip.output_sum_lsb(latent_bits)
    lmask, smask = (1 << latent_bits) - 1, (1 << chip.SUM_WORD_BITS) - 1
    latents = np.empty((len(words), chip.N_LATENT), dtype=np.int64)
    sums = np.empty(len(words), dtype=np.int64)
    for n, h in enumerate(words):
        h = h.strip()
        if len(h) != digits or not re.fullmatch(r"[0-9A-Fa-f]+", h):
            raise EcqaeError(f"{where} {n}: {h!r} is not {digits} hex digits ({latent_bits}-bit latents)")
        v = int(h, 16)
        if v >> nbits:
            raise EcqaeError(f"{where} {n}: {h} has bits set above bit {nbits - 1}")
        for i in range(chip.N_LATENT):
            latents[n, i] = (v >> chip.output_latent_lsb(i, latent_bits)) & lmask
        sums[n] = (v >> sum_lsb) & smask
    return OutputWords(latents, sums, chip.decode_sum(sums).astype(np.int64))
