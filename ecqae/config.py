"""Typed, validated configuration for every stage.

Configs are frozen dataclasses built from plain dicts (YAML/JSON/CLI) by
``from_dict``, which rejects unknown keys and wrong types with a message that
names the file and the key: hls4ml and Keras accept typos silently, we don't.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import chip
from .artifacts import read_text
from .errors import EcqaeError

T = TypeVar("T")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of the on-chip encoder; the firmware types derive from these."""

    weight_bits: int = chip.WEIGHT_BITS
    weight_integer: int = chip.WEIGHT_INTEGER
    conv_act_bits: int = 8
    conv_act_integer: int = 1
    latent_bits: int | None = None  # None: follow the e-link budget (chip.ELINK_LATENT_BITS)
    latent_integer: int = 1

    def __post_init__(self) -> None:
        for name in ("weight_bits", "conv_act_bits", "latent_bits"):
            v = getattr(self, name)
            if v is not None and not 2 <= v <= 16:
                raise ValueError(f"{name} must be in 2..16, got {v}")
        if not 0 <= self.weight_integer < self.weight_bits:
            raise ValueError("weight_integer must be in 0..weight_bits-1")
        if not 0 <= self.conv_act_integer <= self.conv_act_bits:
            raise ValueError("conv_act_integer must be in 0..conv_act_bits")
        if self.latent_bits is not None and not 0 <= self.latent_integer <= self.latent_bits:
            raise ValueError("latent_integer must be in 0..latent_bits")

    @property
    def weight_quantizer(self) -> str:
        return f"quantized_bits({self.weight_bits},{self.weight_integer},alpha=1)"

    @property
    def conv_act_quantizer(self) -> str:
        return f"quantized_relu({self.conv_act_bits},{self.conv_act_integer})"

    @property
    def latent_quantizer(self) -> str:
        # Unsigned latents: the chip sends value * 2^(bits - integer).
        return f"quantized_relu({self.latent_bits},{self.latent_integer})"


@dataclass(frozen=True)
class ModelConfig:
    """The conditional autoencoder: seed-sized encoder, free-form float decoder."""

    elinks: int = 5
    quant: QuantConfig = field(default_factory=QuantConfig)
    decoder_units: tuple[int, ...] = (128, 128, 128)
    conditional: bool = True  # False: plain AE (ablation), decoder sees latents only

    @property
    def latent_bits(self) -> int:
        assert self.quant.latent_bits is not None  # resolved in __post_init__
        return self.quant.latent_bits

    def __post_init__(self) -> None:
        if self.quant.latent_bits is None:
            bits = chip.latent_bits_for_elinks(self.elinks)
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, latent_bits=bits))
        budget = chip.ELINK_BITS * self.elinks - chip.SUM_WORD_BITS - chip.HEADER_BITS
        if chip.N_LATENT * self.latent_bits > budget:
            raise ValueError(
                f"{chip.N_LATENT} latents x {self.latent_bits} bits do not fit {self.elinks} e-links "
                f"({budget} payload bits)"
            )
        if not self.decoder_units or any(u < 1 for u in self.decoder_units):
            raise ValueError("decoder_units must be a non-empty list of positive integers")


@dataclass(frozen=True)
class DataConfig:
    """Where wafers come from: 'embedded' (the seeded generator) or a CSV path."""

    source: str = "embedded"
    n_wafers: int = 200_000  # embedded: how many to make; CSV: at most this many rows (0 = all)
    eta: str = "auto"  # CSV: a column name, a value '2.2', a range '1.6:2.9'; 'auto' = column 'eta'
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        if self.n_wafers < 0:
            raise ValueError("n_wafers must be >= 0")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {v}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: MSE for the first third of the epochs, then the telescope loss."""

    epochs: int = 30
    batch_size: int = 1024
    learning_rate: float = 2e-3
    seed: int = 0
    mse_fraction: float = 1 / 3
    patience: int = 6  # early stopping on validation loss, telescope stage only

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError("learning_rate must be positive")
        if not 0.0 <= self.mse_fraction <= 1.0:
            raise ValueError("mse_fraction must be in [0, 1]")
        if self.patience < 1:
            raise ValueError("patience must be >= 1")

    @property
    def mse_epochs(self) -> int:
        return int(round(self.epochs * self.mse_fraction))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a training run (saved resolved as config.json)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check/convert one value to the annotated type, or raise EcqaeError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise EcqaeError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where, key)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise EcqaeError(f"{where}: {key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise EcqaeError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EcqaeError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EcqaeError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise EcqaeError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise EcqaeError(f"{where}: {key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config", key: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values are errors.

    ``where`` names the file (or 'command line'), ``key`` the dotted path inside it.
    """
    at = f"{where}: {key}" if key else where
    if not isinstance(data, Mapping):
        raise EcqaeError(f"{at}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise EcqaeError(f"{at}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], where, f"{key}.{k}" if key else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise EcqaeError(f"{at}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON/YAML-able dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line error naming the file."""
    p = Path(path)
    text = read_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise EcqaeError(f"{p}: malformed YAML{at}: {problem}") from None
    if data is None:
        raise EcqaeError(f"{p}: file is empty")
    if not isinstance(data, dict):
        raise EcqaeError(f"{p}: expected a mapping at top level, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- firmware

FIRMWARE_BACKENDS = ("Catapult", "Vitis", "Vivado")  # Catapult -> ac_fixed (ASIC); Vitis/Vivado -> ap_fixed (FPGA)
HLS_STRATEGIES = ("Latency", "Resource")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


def _canonical(value: str, allowed: tuple[str, ...], what: str) -> str:
    """Case-insensitive choice, returned in its canonical spelling."""
    for a in allowed:
        if isinstance(value, str) and value.lower() == a.lower():
            return a
    raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class LayerFirmwareConfig:
    """Per-layer hls4ml settings; anything unset is derived from the QKeras quantizers.

    Precisions use hls4ml's syntax, e.g. ``fixed<21,9>`` or ``ufixed<9,1,RND_CONV,SAT>``.
    """

    result: str | None = None
    accum: str | None = None
    reuse_factor: int | None = None
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.reuse_factor is not None and self.reuse_factor < 1:
            raise ValueError(f"reuse_factor must be >= 1, got {self.reuse_factor}")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", _canonical(self.strategy, HLS_STRATEGIES, "strategy"))


@dataclass(frozen=True)
class EncoderFirmwareLayers:
    """One entry per encoder layer (model.ENCODER_LAYERS); other names are rejected."""

    wafer: LayerFirmwareConfig = field(default_factory=LayerFirmwareConfig)
    conv2d: LayerFirmwareConfig = field(default_factory=LayerFirmwareConfig)
    conv_act: LayerFirmwareConfig = field(default_factory=LayerFirmwareConfig)
    dense: LayerFirmwareConfig = field(default_factory=LayerFirmwareConfig)
    latent: LayerFirmwareConfig = field(default_factory=LayerFirmwareConfig)


@dataclass(frozen=True)
class FirmwareConfig:
    """One firmware target (``firmware_configs/*.yaml``): hls4ml backend and its settings.

    The HLS types are not set here: firmware.py derives them from the trained
    model's quantizers, so a retrained model with other bit widths needs no edit.
    ``latent_bits``, when given, asserts the chip's latent format and must match
    the model. ``config_file`` is filled in by ``firmware.load_config``.
    """

    backend: str = ""
    name: str = ""  # project directory under hls/; default: the config file's stem
    run: str | None = None  # run directory to convert; the command line's --run wins
    project_name: str = "econt_encoder"  # top-level C++ function and file names
    io_type: str = "io_parallel"
    clock_period: float = 25.0  # ns
    technology: str | None = None  # Catapult only: 'asic' or 'fpga'
    asic_libs: str | None = None  # Catapult asic: Catapult library name(s), space separated
    part: str | None = None  # FPGA part (Vitis/Vivado, or Catapult with technology 'fpga')
    reuse_factor: int = 1
    strategy: str = "Latency"
    latent_bits: int | None = None
    testbench_wafers: int = 2000  # test-split wafers written to tb_data/ (plus the corner cases)
    layers: EncoderFirmwareLayers = field(default_factory=EncoderFirmwareLayers)
    config_file: str = ""

    def __post_init__(self) -> None:
        import re

        set_ = object.__setattr__
        if not self.backend:
            raise ValueError(f"backend is required (one of {', '.join(FIRMWARE_BACKENDS)})")
        set_(self, "backend", _canonical(self.backend, FIRMWARE_BACKENDS, "backend"))
        set_(self, "strategy", _canonical(self.strategy, HLS_STRATEGIES, "strategy"))
        if self.io_type != "io_parallel":
            raise ValueError(f"io_type must be io_parallel (the verified encoder dataflow), got {self.io_type!r}")
        if not (self.clock_period > 0 and math.isfinite(self.clock_period)):
            raise ValueError(f"clock_period must be a positive number of ns, got {self.clock_period}")
        if self.reuse_factor < 1:
            raise ValueError(f"reuse_factor must be >= 1, got {self.reuse_factor}")
        if self.latent_bits is not None and not 2 <= self.latent_bits <= 16:
            raise ValueError(f"latent_bits must be in 2..16, got {self.latent_bits}")
        if self.testbench_wafers < 0:
            raise ValueError("testbench_wafers must be >= 0")
        if not re.fullmatch(_IDENTIFIER, self.project_name):
            raise ValueError(f"project_name must be a C identifier, got {self.project_name!r}")
        if self.name and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        if self.backend == "Catapult":
            if self.technology not in ("asic", "fpga"):
                raise ValueError(f"technology must be 'asic' or 'fpga' for Catapult, got {self.technology!r}")
            if self.technology == "asic" and not self.asic_libs:
                raise ValueError("asic_libs is required with technology 'asic'")
            if self.technology == "asic" and self.part:
                raise ValueError("part applies to technology 'fpga' only")
            if self.technology == "fpga" and not self.part:
                raise ValueError("part is required with technology 'fpga'")
        else:
            for key in ("technology", "asic_libs"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to the Catapult backend only")
            if not self.part:
                raise ValueError(f"part is required for the {self.backend} backend")

    @property
    def ac_types(self) -> bool:
        """Catapult writes ac_fixed; the Xilinx backends write ap_fixed."""
        return self.backend == "Catapult"


def resolve_run_config(
    config_file: str | None = None,
    data: str | None = None,
    eta: str | None = None,
    wafers: int | None = None,
    epochs: int | None = None,
    elinks: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    no_condition: bool = False,
) -> RunConfig:
    """A RunConfig from an optional YAML file with command-line values on top."""
    raw: dict[str, Any] = read_yaml(config_file) if config_file else {}
    where = str(config_file) if config_file else "command line"
    for section in ("data", "model", "train"):
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise EcqaeError(f"{where}: section '{section}' must be a mapping")
    sets = {
        ("data", "source"): data,
        ("data", "eta"): eta,
        ("data", "n_wafers"): wafers,
        ("data", "seed"): seed,
        ("train", "seed"): seed,
        ("train", "epochs"): epochs,
        ("train", "batch_size"): batch_size,
        ("model", "elinks"): elinks,
        ("model", "conditional"): False if no_condition else None,
    }
    for (section, key), value in sets.items():
        if value is not None:
            raw[section][key] = value
    if elinks is not None and isinstance(raw["model"].get("quant"), dict):
        raw["model"]["quant"].pop("latent_bits", None)  # the e-link flag decides the latent width
    return from_dict(RunConfig, raw, where)
