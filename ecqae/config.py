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


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value to the annotated type, or raise EcqaeError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise EcqaeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise EcqaeError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise EcqaeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EcqaeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EcqaeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise EcqaeError(f"{where}: expected a string, got {value!r}")
        return value
    raise EcqaeError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values are errors."""
    if not isinstance(data, Mapping):
        raise EcqaeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise EcqaeError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise EcqaeError(f"{where}: {exc}") from None


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
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise EcqaeError(f"{p}: file not found") from None
    except OSError as exc:
        raise EcqaeError(f"{p}: cannot read ({exc.strerror})") from None
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
