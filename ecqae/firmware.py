"""Firmware stage: the trained QKeras encoder -> hls4ml HLS projects, compiled for C simulation.

One project per firmware config (``firmware_configs/*.yaml``) in ``hls/<name>/``:
the hls4ml project as hls4ml writes it (``firmware/``, ``build_prj.tcl``, the
testbench and its ``tb_data/``), the g++-compiled C-simulation library, a
``build.log``, an ``ecqae.json`` provenance record and a ``COMPLETE`` marker.

Bit-exactness comes from the types, and every type is derived from the
QKeras quantizers (``model.check_encoder``), never from hls4ml defaults:
- input ``ufixed<9,1>``: the encoder's input grid (chip.INPUT_BITS);
- weights and biases: the weight quantizer (``quantized_bits(6,0)`` = ``fixed<6,1>``);
- conv and dense accumulators and results: exactly as wide as the largest
  possible sum, so nothing is rounded before the activation;
- conv_act and latent results: the activation quantizers with RND_CONV
  (QKeras rounds half to even) and SAT (QKeras clips).
hls4ml keeps the QConv2D/QDense 'linear' activation as a casting layer unless
its type equals the parent's (and drops a QActivation after an ``auto`` type),
so both are pinned, and the converted graph and the generated ``defines.h`` are
checked against what was asked for.

The project is built in a temporary sibling directory and renamed into place
whole (artifacts.atomic_dir) under a lock, then compiled where it will stay:
hls4ml bakes the project's absolute path into the C-simulation library (the
weights directory), so a library compiled elsewhere would read another
directory's weights, or kill the process when that is gone. ``COMPLETE`` is
written last; ``open_project`` refuses anything without it, changed since, or
compiled in another place.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts, chip
from .config import FirmwareConfig, LayerFirmwareConfig, QuantConfig, from_dict, read_yaml, to_dict
from .errors import EcqaeError

Log = Callable[[str], None]

RECORD = "ecqae.json"
BUILD_LOG = "build.log"
TB_DIR = "tb_data"
TB_INPUT = "tb_input_features.dat"  # names the hls4ml testbench reads
TB_OUTPUT = "tb_output_predictions.dat"
TB_WAFERS = "tb_wafers.npz"  # the raw wafers behind the vectors (charges, eta)
FLOAT32_EXACT_BITS = 24  # QKeras computes in float32: sums wider than this may round

# Encoder roles in layer order (model.ENCODER_LAYERS); Keras layer names are looked up by position.
ROLES = ("wafer", "conv2d", "conv_act", "flatten", "dense", "latent")
TYPE_KEYS = (
    ("wafer", "result"),
    ("conv2d", "weight"),
    ("conv2d", "bias"),
    ("conv2d", "accum"),
    ("conv2d", "result"),
    ("conv_act", "result"),
    ("dense", "weight"),
    ("dense", "bias"),
    ("dense", "accum"),
    ("dense", "result"),
    ("latent", "result"),
)
ACTIVATIONS = ("conv_act", "latent")


# ----------------------------------------------------------------------------- precision


ROUNDING = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
SATURATION = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")
_PREC_RE = re.compile(r"^\s*(ap_|ac_)?(u?)(fixed|int)\s*<(.*)>\s*$")
MAX_WIDTH = 128


@dataclass(frozen=True)
class Precision:
    """A fixed-point type as hls4ml, ap_fixed and ac_fixed all understand it.

    ``integer`` counts the sign bit, as in ap_fixed/ac_fixed (QKeras' does not).
    """

    signed: bool
    width: int
    integer: int
    rounding: str = "TRN"
    saturation: str = "WRAP"

    @property
    def frac(self) -> int:
        return self.width - self.integer

    @property
    def lo(self) -> Fraction:
        return -(Fraction(2) ** (self.integer - 1)) if self.signed else Fraction(0)

    @property
    def hi(self) -> Fraction:
        top = self.integer - 1 if self.signed else self.integer
        return Fraction(2) ** top - Fraction(2) ** -self.frac

    def __str__(self) -> str:
        """hls4ml config syntax; rounding/saturation only when not the defaults."""
        modes = "" if (self.rounding, self.saturation) == ("TRN", "WRAP") else f",{self.rounding},{self.saturation}"
        return f"{'' if self.signed else 'u'}fixed<{self.width},{self.integer}{modes}>"

    def same_grid(self, other: Precision) -> bool:
        """Same representable values (rounding/saturation aside)."""
        return (self.signed, self.width, self.integer) == (other.signed, other.width, other.integer)


def _mode(token: str, allowed: tuple[str, ...], prefix: str, what: str, text: str) -> str:
    t = token.strip().upper()
    if prefix and t.startswith(prefix):
        t = t[len(prefix) :]
    if t not in allowed:
        raise ValueError(f"unknown {what} mode '{token.strip()}' in '{text}' (one of {', '.join(allowed)})")
    return t


def parse_precision(text: str) -> Precision:
    """Parse hls4ml (``fixed<W,I,RND_CONV,SAT>``), ap_ and ac_ type strings; ValueError if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a precision string, got {text!r}")
    m = _PREC_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse precision '{text}' (expected e.g. fixed<21,9> or ufixed<9,1,RND_CONV,SAT>)")
    family, unsigned, kind, body = m.group(1) or "", m.group(2) == "u", m.group(3), m.group(4)
    args = [a.strip() for a in body.split(",")] if body.strip() else []
    try:
        width = int(args[0])
    except (IndexError, ValueError):
        raise ValueError(f"cannot parse precision '{text}': the width must be an integer") from None
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"precision '{text}': width must be in 1..{MAX_WIDTH}")
    signed = not unsigned
    if family == "ac_":
        if unsigned:
            raise ValueError(f"cannot parse precision '{text}' (ac types take signedness as a parameter)")
        rest = args[1:]
        if kind == "fixed":
            if not rest:
                raise ValueError(f"cannot parse precision '{text}': integer bits missing")
            integer_s, rest = rest[0], rest[1:]
        else:
            integer_s = str(width)
        if rest:
            if rest[0] not in ("true", "false"):
                raise ValueError(f"cannot parse precision '{text}': signedness must be true/false")
            signed, rest = rest[0] == "true", rest[1:]
        prefix = "AC_"
    else:
        if kind == "fixed":
            if len(args) < 2:
                raise ValueError(f"cannot parse precision '{text}': integer bits missing")
            integer_s, rest = args[1], args[2:]
        else:
            integer_s, rest = str(width), args[1:]
        prefix = "AP_"
    try:
        integer = int(integer_s)
    except ValueError:
        raise ValueError(f"cannot parse precision '{text}': integer bits must be an integer") from None
    if not -MAX_WIDTH <= integer <= MAX_WIDTH:
        raise ValueError(f"precision '{text}': integer bits out of range")
    if kind == "int" and rest and family != "ac_":
        raise ValueError(f"cannot parse precision '{text}': int<W> takes no modes")
    rounding = _mode(rest[0], ROUNDING, prefix, "rounding", text) if len(rest) > 0 else "TRN"
    saturation = _mode(rest[1], SATURATION, prefix, "saturation", text) if len(rest) > 1 else "WRAP"
    if len(rest) > 2:
        try:
            int(rest[2])
        except ValueError:
            raise ValueError(f"cannot parse precision '{text}': saturation bits must be an integer") from None
        if len(rest) > 3:
            raise ValueError(f"cannot parse precision '{text}': too many parameters")
    return Precision(signed, width, integer, rounding, saturation)


# ----------------------------------------------------------------------------- types from quantizers


def _fixed_for_range(lo: Fraction, hi: Fraction, frac: int) -> Precision:
    """The narrowest signed type on the 2^-frac grid holding every value in [lo, hi]."""
    integer = 1
    while -(Fraction(2) ** (integer - 1)) > lo or Fraction(2) ** (integer - 1) - Fraction(2) ** -frac < hi:
        integer += 1
    return Precision(True, integer + frac, integer)


def accumulator(n_terms: int, x: Precision, w: Precision, b: Precision) -> Precision:
    """Exact type of bias + sum of ``n_terms`` products x*w: no rounding, no overflow."""
    corners = [x.lo * w.lo, x.lo * w.hi, x.hi * w.lo, x.hi * w.hi]
    lo = n_terms * min(corners) + b.lo
    hi = n_terms * max(corners) + b.hi
    return _fixed_for_range(lo, hi, max(x.frac + w.frac, b.frac))


def derive_types(quant: QuantConfig) -> dict[tuple[str, str], Precision]:
    """Every HLS type of the encoder, from its quantizers (see the module docstring)."""
    if quant.latent_bits is None:
        raise EcqaeError("latent width unresolved: derive types from model.check_encoder's QuantConfig")
    x = Precision(False, chip.INPUT_BITS, chip.INPUT_BITS - chip.INPUT_FRAC_BITS)
    w = Precision(True, quant.weight_bits, quant.weight_integer + 1)  # QKeras' integer excludes the sign
    act = Precision(False, quant.conv_act_bits, quant.conv_act_integer, "RND_CONV", "SAT")
    latent = Precision(False, quant.latent_bits, quant.latent_integer, "RND_CONV", "SAT")
    conv_acc = accumulator(chip.CONV_KERNEL * chip.CONV_KERNEL, x, w, w)
    dense_acc = accumulator(chip.DENSE_INPUTS, act, w, w)
    return {
        ("wafer", "result"): x,
        ("conv2d", "weight"): w,
        ("conv2d", "bias"): w,
        ("conv2d", "accum"): conv_acc,
        ("conv2d", "result"): conv_acc,
        ("conv_act", "result"): act,
        ("dense", "weight"): w,
        ("dense", "bias"): w,
        ("dense", "accum"): dense_acc,
        ("dense", "result"): dense_acc,
        ("latent", "result"): latent,
    }


def resolve_types(fw: FirmwareConfig, quant: QuantConfig) -> dict[tuple[str, str], Precision]:
    """Derived types with the config's per-layer overrides applied.

    Overrides may change rounding, saturation and the conv/dense widths (make
    verify judges the result), but not the grid of the input or of an
    activation: that is the chip's format and the decoder's training input.
    """
    where = fw.config_file or fw.name or "firmware config"
    types = derive_types(quant)
    derived = dict(types)
    for role in ("wafer", "conv2d", "conv_act", "dense", "latent"):
        layer: LayerFirmwareConfig = getattr(fw.layers, role)
        for kind in ("result", "accum"):
            text = getattr(layer, kind)
            if text is None:
                continue
            key = f"layers.{role}.{kind}"
            try:
                p = parse_precision(text)
            except ValueError as exc:
                raise EcqaeError(f"{where}: {key}: {exc}") from None
            want = derived[(role, kind)]
            if (role in ACTIVATIONS or role == "wafer") and not p.same_grid(want):
                source = {
                    "wafer": f"the encoder input grid ufixed<{chip.INPUT_BITS},1>",
                    "conv_act": f"the trained conv_act quantizer {quant.conv_act_quantizer}",
                    "latent": f"the trained latent quantizer {quant.latent_quantizer}",
                }[role]
                raise EcqaeError(
                    f"{where}: {key}: {text} is {p.width} bits ({p.integer} integer) but {source} "
                    f"needs {Precision(want.signed, want.width, want.integer)}"
                )
            types[(role, kind)] = p
    if fw.latent_bits is not None and fw.latent_bits != quant.latent_bits:
        raise EcqaeError(
            f"{where}: latent_bits: {fw.latent_bits} but the trained model has {quant.latent_bits}-bit latents "
            f"({quant.latent_quantizer})"
        )
    return types


def check_config_keys(fw: FirmwareConfig) -> None:
    """Per-layer keys that make no sense for a layer are errors, not silently ignored."""
    where = fw.config_file or fw.name
    for role in ("wafer", "conv_act", "latent"):
        layer = getattr(fw.layers, role)
        if layer.accum is not None:
            raise EcqaeError(f"{where}: layers.{role}.accum: only conv2d and dense have an accumulator")
    w = fw.layers.wafer
    if w.reuse_factor is not None or w.strategy is not None:
        raise EcqaeError(f"{where}: layers.wafer: only 'result' applies to the input")
    for role in ACTIVATIONS:
        layer = getattr(fw.layers, role)
        if layer.strategy is not None:
            raise EcqaeError(f"{where}: layers.{role}.strategy: only conv2d and dense have a strategy")
    for role in ("wafer", "conv2d", "conv_act", "dense", "latent"):
        layer = getattr(fw.layers, role)
        for kind in ("result", "accum"):
            text = getattr(layer, kind)
            if text is not None:
                try:
                    parse_precision(text)
                except ValueError as exc:
                    raise EcqaeError(f"{where}: layers.{role}.{kind}: {exc}") from None


def load_config(path: str | Path) -> FirmwareConfig:
    """Read and validate one firmware config; every problem names the file and key."""
    p = Path(path)
    raw = read_yaml(p)
    if "config_file" in raw:
        raise EcqaeError(f"{p}: unknown key(s) config_file")
    fw = from_dict(FirmwareConfig, raw, str(p))
    fw = replace(fw, config_file=str(p), name=fw.name or p.stem)
    check_config_keys(fw)
    return fw


def types_summary(types: dict[tuple[str, str], Precision]) -> str:
    return (
        f"input {types['wafer', 'result']}, weights {types['conv2d', 'weight']}, "
        f"conv {types['conv2d', 'accum']} -> {types['conv_act', 'result']}, "
        f"dense {types['dense', 'accum']} -> latent {types['latent', 'result']}"
    )


# ----------------------------------------------------------------------------- hls4ml conversion


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet(log: Log | None = None) -> Iterator[io.StringIO]:
    """hls4ml prints a page per conversion; keep it, show it only on failure."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    except Exception:
        if log is not None and buf.getvalue().strip():
            log(buf.getvalue().rstrip())
        raise


def role_names(encoder: Any) -> dict[str, str]:
    """Encoder role -> Keras layer name (the contract fixes the order, not the names)."""
    return {role: layer.name for role, layer in zip(ROLES, encoder.layers, strict=True)}


def hls_config(encoder: Any, fw: FirmwareConfig, types: dict[tuple[str, str], Precision], trace: bool = False) -> dict:
    """The hls4ml configuration: every precision pinned, nothing left 'auto'."""
    import hls4ml

    names = role_names(encoder)
    with _quiet():
        hc = hls4ml.utils.config_from_keras_model(
            encoder, granularity="name", backend=fw.backend, default_precision=str(types["conv2d", "accum"])
        )
    layers = hc["LayerName"]
    # hls4ml's own reading of the weight quantizers must agree with ours.
    for role in ("conv2d", "dense"):
        for kind in ("weight", "bias"):
            got = parse_precision(str(layers[names[role]]["Precision"][kind]))
            if not got.same_grid(types[role, kind]):
                raise EcqaeError(
                    f"hls4ml reads layer '{names[role]}' {kind} quantizer as {got}, expected {types[role, kind]}"
                )
    expected = set(names.values()) | {f"{names['conv2d']}_linear", f"{names['dense']}_linear"}
    unexpected = sorted(set(layers) - expected)
    if unexpected:
        raise EcqaeError(f"hls4ml sees unexpected layer(s) {', '.join(unexpected)} in the encoder")

    def pin(name: str, **precisions: Precision) -> None:
        entry = layers.setdefault(name, {})
        entry.setdefault("Precision", {})
        entry["Precision"].update({k: str(v) for k, v in precisions.items()})
        entry["Trace"] = trace

    pin(names["wafer"], result=types["wafer", "result"])
    for role in ("conv2d", "dense"):
        result = types[role, "result"]
        pin(
            names[role],
            result=result,
            accum=types[role, "accum"],
            weight=types[role, "weight"],
            bias=types[role, "bias"],
        )
        # The Q-layer's built-in linear activation: same type as its parent, so hls4ml removes it.
        pin(f"{names[role]}_linear", result=result)
        layer_cfg: LayerFirmwareConfig = getattr(fw.layers, role)
        layers[names[role]]["ReuseFactor"] = layer_cfg.reuse_factor or fw.reuse_factor
        layers[names[role]]["Strategy"] = layer_cfg.strategy or fw.strategy
    pin(names["conv_act"], result=types["conv_act", "result"])
    pin(names["flatten"], result=types["conv_act", "result"])
    pin(names["latent"], result=types["latent", "result"])
    for role in ACTIVATIONS:
        rf = getattr(fw.layers, role).reuse_factor
        if rf is not None:
            layers[names[role]]["ReuseFactor"] = rf
    hc["Model"]["ReuseFactor"] = fw.reuse_factor
    hc["Model"]["Strategy"] = fw.strategy
    hc["Model"]["TraceOutput"] = trace
    return hc


def _backend_kwargs(fw: FirmwareConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"io_type": fw.io_type, "clock_period": fw.clock_period}
    if fw.backend == "Catapult":
        kw["tech"] = fw.technology
        if fw.technology == "asic":
            kw["asiclibs"] = fw.asic_libs
        else:
            kw["part"] = fw.part
    else:
        kw["part"] = fw.part
    return kw


def build_graph(
    encoder: Any,
    fw: FirmwareConfig,
    types: dict[tuple[str, str], Precision],
    output_dir: Path,
    trace: bool = False,
    testbench: bool = False,
) -> Any:
    """hls4ml ModelGraph of the encoder (not yet written), checked against the requested types.

    ``testbench``: name the tb_data files, which write() then copies from the
    working directory (see ``_write``); the Catapult flow passes them to SCVerify.
    """
    import hls4ml

    hc = hls_config(encoder, fw, types, trace=trace)
    tb = {"input_data_tb": TB_INPUT, "output_data_tb": TB_OUTPUT} if testbench else {}
    where = fw.config_file or fw.name
    try:
        with _quiet():
            hm = hls4ml.converters.convert_from_keras_model(
                encoder,
                hls_config=hc,
                output_dir=str(output_dir),
                project_name=fw.project_name,
                backend=fw.backend,
                **tb,
                **_backend_kwargs(fw),
            )
    except Exception as exc:  # hls4ml raises bare Exceptions (and worse) for what it cannot convert
        raise EcqaeError(f"{where}: hls4ml conversion failed: {_one_line(exc)}") from exc
    check_graph(hm, encoder, types, where)
    return hm


def _graph_types(hm: Any, encoder: Any) -> dict[tuple[str, str], tuple[str, Precision]]:
    """(role, kind) -> (C typedef name, precision) as hls4ml will write them."""
    names = role_names(encoder)
    by_name = {layer.name: layer for layer in hm.get_layers()}
    out: dict[tuple[str, str], tuple[str, Precision]] = {}
    for role, kind in TYPE_KEYS:
        layer = by_name[names[role]]
        if kind == "result":
            t = layer.get_output_variable().type
        elif kind in ("weight", "bias"):
            t = layer.weights[kind].type
        else:
            t = layer.types["accum_t"]
        out[(role, kind)] = (t.name, parse_precision(str(t.precision)))
    return out


def check_graph(hm: Any, encoder: Any, types: dict[tuple[str, str], Precision], where: str) -> None:
    """The optimised graph is exactly the encoder (no dropped or extra layer) with our types."""
    from hls4ml.model import layers as L

    names = role_names(encoder)
    want = [
        (names["wafer"], L.Input),
        (names["conv2d"], L.Conv2D),
        (names["conv_act"], L.Activation),
        (names["flatten"], L.Reshape),
        (names["dense"], L.Dense),
        (names["latent"], L.Activation),
    ]
    got = [(layer.name, type(layer).__name__) for layer in hm.get_layers()]
    ok = len(got) == len(want) and all(
        g[0] == n and isinstance(layer, cls) for g, (n, cls), layer in zip(got, want, hm.get_layers(), strict=False)
    )
    if not ok:
        raise EcqaeError(
            f"{where}: hls4ml graph is {' -> '.join(f'{n} ({c})' for n, c in got)}, expected "
            f"{' -> '.join(n for n, _ in want)}: a layer was dropped or a cast inserted"
        )
    for role in ACTIVATIONS:
        act = hm.graph[names[role]].get_attr("activation")
        if str(act).lower() != "relu":
            raise EcqaeError(f"{where}: hls4ml turned layer '{names[role]}' into '{act}', expected relu")
    for key, (cname, p) in _graph_types(hm, encoder).items():
        if p != types[key]:
            raise EcqaeError(f"{where}: hls4ml gives {key[0]} {key[1]} ({cname}) {p}, expected {types[key]}")


_TYPEDEF_RE = re.compile(r"^\s*typedef\s+(.+?)\s+(\w+)\s*;\s*$")


def read_typedefs(defines_h: Path) -> dict[str, str]:
    """C typedef name -> type string, from a generated defines.h."""
    out: dict[str, str] = {}
    for line in defines_h.read_text().splitlines():
        m = _TYPEDEF_RE.match(line)
        if m:
            out[m.group(2)] = m.group(1).replace(" ", "")
    return out


def check_defines(
    defines_h: Path, hm: Any, encoder: Any, types: dict[tuple[str, str], Precision], ac_types: bool
) -> dict[str, str]:
    """Fail loudly unless defines.h declares exactly the requested types (in ac_ or ap_ form)."""
    typedefs = read_typedefs(defines_h)
    family = "ac_" if ac_types else "ap_"
    for key, (cname, _) in _graph_types(hm, encoder).items():
        text = typedefs.get(cname)
        if text is None:
            raise EcqaeError(f"{defines_h}: no typedef for {cname} ({key[0]} {key[1]})")
        if not text.startswith(family):
            raise EcqaeError(f"{defines_h}: {cname} is {text}, expected an {family}fixed type")
        try:
            got = parse_precision(text)
        except ValueError as exc:
            raise EcqaeError(f"{defines_h}: {cname}: {exc}") from None
        if got != types[key]:
            raise EcqaeError(f"{defines_h}: {key[0]} {key[1]} is {cname} = {text}, expected {types[key]}")
    return typedefs


# ----------------------------------------------------------------------------- g++ build


def _build_script_value(script: str, name: str) -> str:
    m = re.search(rf"^{name}=(\S+)\s*$", script, re.M)
    if not m:
        raise EcqaeError(f"build_lib.sh: no {name}= line (not an hls4ml project?)")
    return m.group(1)


def library_path(project: Path) -> Path:
    """The C-simulation library build_lib.sh produces (name and stamp read from the script)."""
    script = (project / "build_lib.sh").read_text()
    name = _build_script_value(script, "PROJECT")
    stamp = _build_script_value(script, "LIB_STAMP")
    return project / "firmware" / f"{name}-{stamp}.so"


def _first_errors(output: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b", ln, re.I)]
    return " | ".join((errors or lines[-n:])[:n]) or "no compiler output"


def compile_project(project: Path, log: Log = print) -> tuple[Path, float]:
    """Run the project's build_lib.sh with g++; any failure is a build error with g++'s first errors.

    hls4ml's Catapult build_lib.sh has no ``set -e``, so a failed compile would
    otherwise surface later as a missing library: run it under ``bash -e`` and
    check the library exists. A set ``MGC_HOME`` would put Catapult's installed
    headers ahead of the ones shipped in the project, so it is left out.
    """
    project = Path(project)
    lib = library_path(project)
    lib.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MGC_HOME"}
    if "MGC_HOME" in os.environ:
        log("note: MGC_HOME ignored for the C simulation build (the project's own ac_types headers are used)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            ["bash", "-e", "build_lib.sh"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise EcqaeError(f"{project}: cannot run build_lib.sh ({exc})") from None
    seconds = time.perf_counter() - t0
    artifacts.write_text(project / BUILD_LOG, proc.stdout)
    if proc.returncode != 0 or not lib.is_file():
        raise EcqaeError(
            f"{project}: g++ build failed (exit {proc.returncode}): {_first_errors(proc.stdout)} "
            f"(full log: {project / BUILD_LOG})"
        )
    return lib, seconds


def compiler_version() -> str:
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "g++ not found"
    return out.splitlines()[0] if out else "unknown"


# ----------------------------------------------------------------------------- C simulation


class CSim:
    """A compiled C simulation, called through hls4ml's bridge ABI (``<project>_double``).

    Calls pass raw pointers: numpy's ndpointer argument checks cost more than
    the Catapult C simulation itself (measured: 75k -> 190k wafers/s).
    """

    def __init__(self, library: Path, project_name: str, n_inputs: int, n_outputs: int) -> None:
        try:
            self._lib = ctypes.CDLL(str(library))
            fn = getattr(self._lib, f"{project_name}_double")
        except (OSError, AttributeError) as exc:
            raise EcqaeError(f"{library}: cannot load the C simulation ({exc})") from None
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._fn = fn
        self.n_inputs, self.n_outputs = n_inputs, n_outputs

    def run(self, images: np.ndarray) -> np.ndarray:
        """(N, 9, 9, 1) encoder inputs -> (N, 16) latent values, one C call per wafer."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float64).reshape(len(images), -1))
        if x.shape[1] != self.n_inputs:
            raise EcqaeError(f"C simulation takes {self.n_inputs} inputs per wafer, got {x.shape[1]}")
        out = np.zeros((len(x), self.n_outputs), dtype=np.float64)
        fn, xp, op = self._fn, x.ctypes.data, out.ctypes.data
        step_in, step_out = x.strides[0], out.strides[0]
        for i in range(len(x)):
            fn(xp + i * step_in, op + i * step_out)
        return out


def encoder_images(charges: np.ndarray) -> np.ndarray:
    """Integer charges -> the encoder's 9x9 input images on the input grid (chip.normalise)."""
    x, _ = chip.normalise(charges)
    return chip.tc_to_image(x)


def latent_codes(values: np.ndarray, quant: QuantConfig) -> np.ndarray:
    """Latent values -> the unsigned integer codes the chip sends (value * 2^(bits - integer)).

    Values off the latent grid (a wrong type) stay visible: they come back as
    float codes with a fractional part instead of being rounded away.
    """
    assert quant.latent_bits is not None
    codes = np.asarray(values, dtype=np.float64) * float(2 ** (quant.latent_bits - quant.latent_integer))
    if np.all(codes == np.rint(codes)):
        return codes.astype(np.int64)
    return codes


# ----------------------------------------------------------------------------- projects


def _format_values(a: np.ndarray) -> list[str]:
    """Shortest exact decimal for each value (grid values are dyadic: exact in text)."""
    cache: dict[float, str] = {}
    lines = []
    for row in np.asarray(a, dtype=np.float64):
        parts = []
        for v in row.tolist():
            s = cache.get(v)
            if s is None:
                s = cache[v] = np.format_float_positional(v, trim="-")
            parts.append(s)
        lines.append(" ".join(parts))
    return lines


def write_testbench(tb_dir: Path, images: np.ndarray, expected: np.ndarray) -> None:
    """tb_data in the hls4ml testbench format: one wafer per line, space-separated values."""
    tb_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in ((TB_INPUT, images.reshape(len(images), -1)), (TB_OUTPUT, expected)):
        (tb_dir / name).write_text("\n".join(_format_values(arr)) + "\n")


def _check_testbench(tb_dir: Path, images: np.ndarray, expected: np.ndarray) -> None:
    for name, arr in ((TB_INPUT, images.reshape(len(images), -1)), (TB_OUTPUT, expected)):
        back = np.loadtxt(tb_dir / name, ndmin=2)
        if back.shape != arr.shape or not np.array_equal(back, arr.astype(np.float64)):
            raise EcqaeError(f"{tb_dir / name}: testbench vectors do not read back exactly")


def _write(hm: Any, stage: Path) -> None:
    """hm.write() from the directory holding the tb_data files it copies (it takes bare names)."""
    cwd = os.getcwd()
    os.chdir(stage)
    try:
        hm.write()
    except Exception as exc:
        raise EcqaeError(f"{hm.config.get_output_dir()}: hls4ml could not write the project: {_one_line(exc)}") from exc
    finally:
        os.chdir(cwd)


def _relocate(tmp: Path, dest: Path) -> int:
    """Point hls4ml's absolute paths (bridge weights dir, hls4ml_config.yml) at the final place."""
    old, new = str(tmp), str(dest)
    changed = 0
    for path in tmp.rglob("*"):
        if not path.is_file() or path.stat().st_size > 4 << 20:
            continue
        raw = path.read_bytes()
        if b"\0" in raw or old.encode() not in raw:
            continue
        path.write_bytes(raw.replace(old.encode(), new.encode()))
        changed += 1
    return changed


@contextlib.contextmanager
def _project_lock(out_dir: Path, name: str) -> Iterator[None]:
    """Serialise builds of one project: two concurrent runs take turns, each result whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def project_files(project: Path) -> list[str]:
    return sorted(
        str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and p.name != artifacts.COMPLETE
    )


def convert(
    encoder: Any,
    quant: QuantConfig,
    fw: FirmwareConfig,
    out_dir: Path,
    log: Log = print,
    *,
    wafers: Any = None,
    run_id: str | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Convert, write, compile and record one project in ``out_dir/<fw.name>/``; returns its path.

    ``wafers`` (data.Wafers, e.g. the run's test split) feed the testbench
    vectors, with the corner cases; the first ``fw.testbench_wafers`` are used.
    """
    from . import model as mdl
    from .verify import corner_cases

    where = fw.config_file or fw.name
    actual = mdl.check_encoder(encoder)
    if actual != quant:
        raise EcqaeError(f"{where}: the encoder was trained with {actual}, not the given {quant}")
    types = resolve_types(fw, quant)
    for role in ("conv2d", "dense"):
        if types[role, "accum"].width > FLOAT32_EXACT_BITS:
            log(
                f"warning: {fw.name}: {role} accumulator {types[role, 'accum']} is wider than "
                f"{FLOAT32_EXACT_BITS} bits; QKeras (float32) may not be reproduced exactly"
            )
    out_dir = Path(out_dir).resolve()
    dest = out_dir / fw.name
    ac = fw.ac_types
    log(f"{fw.name}: hls4ml {fw.backend} ({'ac_fixed' if ac else 'ap_fixed'}, {fw.io_type}) -> {dest}")
    log(f"{fw.name}: types {types_summary(types)}")

    corners = corner_cases()
    tb_charges = [corners.charges]
    tb_eta = [corners.eta]
    n_test = 0
    if wafers is not None and fw.testbench_wafers > 0:
        n_test = min(len(wafers), fw.testbench_wafers)
        tb_charges.insert(0, wafers.charges[:n_test])
        tb_eta.insert(0, wafers.eta[:n_test])
    charges = np.concatenate(tb_charges).astype(np.int32)
    eta = np.concatenate(tb_eta).astype(np.float32)
    images = encoder_images(charges)
    expected = mdl.encode(encoder, images)

    import hls4ml

    with _project_lock(out_dir, fw.name):
        t0 = time.perf_counter()
        with artifacts.atomic_dir(dest) as tmp:
            tmp = tmp.resolve()
            stage = tmp / ".tb_stage"
            write_testbench(stage, images, expected)
            with _quiet(log):
                hm = build_graph(encoder, fw, types, tmp, testbench=True)
                _write(hm, stage)
            shutil.rmtree(stage)
            Path(f"{tmp}.tar.gz").unlink(missing_ok=True)  # Catapult's writer always archives the project
            typedefs = check_defines(tmp / "firmware" / "defines.h", hm, encoder, types, ac)
            _check_testbench(tmp / TB_DIR, images, expected)
            with open(tmp / TB_DIR / TB_WAFERS, "wb") as f:
                np.savez_compressed(f, charges=charges, eta=eta)
            _relocate(tmp, dest)
            stale = [p for p in project_files(tmp) if str(tmp).encode() in (tmp / p).read_bytes()]
            if stale:
                raise EcqaeError(f"{dest}: still refers to its build directory in {', '.join(stale[:3])}")
            stamp = hm.config.get_config_value("Stamp")
            write_seconds = time.perf_counter() - t0
        # Renamed into place: compile here, where the library's baked-in paths stay valid.
        log(f"{fw.name}: written in {write_seconds:.1f} s; compiling the C simulation with g++")
        lib, compile_seconds = compile_project(dest, log)
        csim = CSim(lib, fw.project_name, chip.IMAGE_SIZE * chip.IMAGE_SIZE, chip.N_LATENT)
        t1 = time.perf_counter()
        got = csim.run(images)
        csim_seconds = time.perf_counter() - t1
        bad = int(np.sum(latent_codes(got, quant) != latent_codes(expected, quant)))
        log(
            f"{fw.name}: compiled in {compile_seconds:.1f} s; testbench {len(images):,} wafers "
            f"({n_test:,} test split + {len(corners):,} corner cases): "
            + ("C simulation == QKeras" if bad == 0 else f"{bad:,} latents differ from QKeras (run make verify)")
        )
        record = {
            "project": fw.name,
            "backend": fw.backend,
            "hls_types": "ac_fixed" if ac else "ap_fixed",
            "project_name": fw.project_name,
            "stamp": stamp,
            "library": str(lib.relative_to(dest)),
            "compiled_in": str(dest),
            "run_id": run_id,
            "run_dir": str(run_dir) if run_dir is not None else None,
            "config_file": fw.config_file,
            "config": to_dict(fw),
            "quant": to_dict(quant),
            "quantizers": {
                "weight": quant.weight_quantizer,
                "conv_act": quant.conv_act_quantizer,
                "latent": quant.latent_quantizer,
            },
            "types": {f"{role}.{kind}": str(p) for (role, kind), p in types.items()},
            "typedefs": typedefs,
            "testbench": {
                "wafers": len(images),
                "test_split": n_test,
                "corner_cases": len(corners),
                "input": f"{TB_DIR}/{TB_INPUT}",
                "expected": f"{TB_DIR}/{TB_OUTPUT}",
                "csim_mismatched_latents": bad,
            },
            "timings": {
                "write_seconds": round(write_seconds, 3),
                "compile_seconds": round(compile_seconds, 3),
                "csim_wafers_per_s": round(len(images) / max(csim_seconds, 1e-9), 1),
            },
            "toolchain": {"hls4ml": hls4ml.__version__, "compiler": compiler_version()},
        }
        artifacts.write_json(dest / RECORD, record)
        artifacts.mark_complete(dest, project_files(dest), {"project": fw.name, "run_id": run_id})
    return dest


def convert_all(run_dir: Path | None, config_paths: list[Path], out_dir: Path, log: Log = print) -> list[Path]:
    """``make hls``: every config validated (and checked against its model) first, then converted."""
    from . import model as mdl
    from . import train

    if not config_paths:
        raise EcqaeError("no firmware configs given (firmware_configs/*.yaml)")
    fws = [load_config(p) for p in config_paths]
    seen: dict[str, str] = {}
    for fw in fws:
        if fw.name in seen:
            raise EcqaeError(f"{fw.config_file}: project name '{fw.name}' is also used by {seen[fw.name]}")
        seen[fw.name] = fw.config_file
    runs: dict[Path, Any] = {}
    plan = []
    for fw in fws:
        path = Path(run_dir or fw.run or "runs/default")
        if path not in runs:
            run = train.load_run(path)
            runs[path] = (run, mdl.check_encoder(run.encoder(), str(path / "encoder.h5")))
        run, quant = runs[path]
        resolve_types(fw, quant)  # fail on a contradicting config before anything is written
        plan.append((fw, path, run, quant))
    (out_dir / "verify.json").unlink(missing_ok=True)  # stale as soon as any project is rebuilt
    out = []
    for fw, path, run, quant in plan:
        out.append(
            convert(run.encoder(), quant, fw, out_dir, log, wafers=run.test_wafers(), run_id=run.run_id, run_dir=path)
        )
    return out


def testbench_mismatches(project: Path) -> int:
    """Latents where the freshly compiled C simulation disagreed with QKeras on the testbench."""
    record = json.loads((Path(project) / RECORD).read_text())
    return int(record["testbench"]["csim_mismatched_latents"])


@dataclass
class Project:
    """A complete, unchanged project in its build place, ready to simulate."""

    path: Path
    record: dict[str, Any]

    @property
    def library(self) -> Path:
        return self.path / self.record["library"]

    def csim(self) -> CSim:
        return CSim(self.library, self.record["project_name"], chip.IMAGE_SIZE * chip.IMAGE_SIZE, chip.N_LATENT)

    def defines(self) -> str:
        return (self.path / "firmware" / "defines.h").read_text()


def open_project(path: str | Path, fw: FirmwareConfig | None = None, run_id: str | None = None) -> Project:
    """Open ``hls/<name>`` for verification; refuse what would not test the right bits.

    Refused: missing or unfinished (no COMPLETE), files changed since the build,
    a project compiled elsewhere (its library reads another directory's
    weights), built from another config or from another training run.
    """
    p = Path(path)
    if not p.is_dir():
        raise EcqaeError(f"{p}: no HLS project here (run make hls first)")
    artifacts.verified_complete(
        p, "project is incomplete (interrupted or failed build?); rerun make hls", "make hls built it; rerun make hls"
    )
    try:
        record = json.loads((p / RECORD).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EcqaeError(f"{p / RECORD}: unreadable ({exc})") from None
    if Path(record["compiled_in"]).resolve() != p.resolve():
        raise EcqaeError(
            f"{p}: compiled in {record['compiled_in']}; its C simulation reads that directory's weights, "
            "so a moved or copied project must be rebuilt (make hls)"
        )
    if fw is not None:
        saved = dict(record["config"])
        now = to_dict(fw)
        saved.pop("config_file", None)
        now.pop("config_file", None)
        if saved != now:
            raise EcqaeError(f"{p}: built from a different version of {fw.config_file}; rerun make hls")
    if run_id is not None and record.get("run_id") != run_id:
        raise EcqaeError(f"{p}: built from run {record.get('run_id')}, not run {run_id}; rerun make hls")
    return Project(p, record)


def run_testbench(project: Path, workdir: Path) -> np.ndarray:
    """Build the hls4ml testbench (``<project>_test.cpp``) with g++ and run it on tb_data/, as the
    vendor C simulation would, in a copy of the project; returns its results (one row per wafer).

    Values come back as the testbench prints them (Vitis: 6 significant
    digits), enough to identify every point of a latent grid up to 16 bits.
    """
    project = Path(project)
    record = json.loads((project / RECORD).read_text())
    name = record["project_name"]
    work = Path(workdir) / project.name
    shutil.copytree(project, work)
    inc = ["-Ifirmware", "-Ifirmware/nnet_utils"]
    if record["hls_types"] == "ac_fixed":
        inc += [f"-Ifirmware/{d}/include" for d in ("ac_types", "ac_math", "ac_simutils")]
        args = ["firmware/weights", f"{TB_DIR}/{TB_INPUT}", f"{TB_DIR}/{TB_OUTPUT}"]
    else:
        inc += ["-Ifirmware/ap_types", f'-DWEIGHTS_DIR="{work / "firmware" / "weights"}"']
        args = []
    cmd = ["g++", "-O2", "-std=c++14", *inc, f"{name}_test.cpp", f"firmware/{name}.cpp", "-o", "testbench"]
    build = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
    if build.returncode != 0:
        raise EcqaeError(f"{work}: g++ build of the testbench failed: {_first_errors(build.stderr)}")
    run = subprocess.run(["./testbench", *args], cwd=work, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise EcqaeError(f"{work}: testbench exited with {run.returncode}: {_first_errors(run.stdout + run.stderr)}")
    return np.loadtxt(work / TB_DIR / "csim_results.log", ndmin=2)


def trace(
    encoder: Any, fw: FirmwareConfig, quant: QuantConfig, images: np.ndarray, workdir: Path, log: Log = print
) -> tuple[dict[str, np.ndarray], str]:
    """hls4ml trace of every layer for a few wafers, from a traced rebuild of the same config.

    Returns (Keras layer name -> per-wafer outputs, the traced build's defines.h)
    so the caller can confirm the rebuild has the project's types.
    """
    types = resolve_types(fw, quant)
    prj = Path(workdir) / fw.name  # a subdirectory: Catapult's writer drops <prj>.tar.gz next to it
    with _quiet(log):
        hm = build_graph(encoder, fw, types, prj, trace=True)
        _, traces = hm.trace(np.ascontiguousarray(images, dtype=np.float64))
    defines = (prj / "firmware" / "defines.h").read_text()
    return {k: np.asarray(v).reshape(len(images), -1) for k, v in traces.items()}, defines
