"""Command line: thin wrappers that parse arguments and call the stage modules.

Stage modules are imported lazily so ``ecqae --help`` does not pay for
TensorFlow. Every ``EcqaeError`` becomes one line on stderr and exit status 2
(``--debug`` shows the traceback); a failed verification exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import EcqaeError

Handler = Callable[[argparse.Namespace], int]


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import resolve_run_config

    cfg = resolve_run_config(
        config_file=args.config,
        data=args.data,
        eta=args.eta,
        wafers=args.wafers,
        epochs=args.epochs,
        elinks=args.elinks,
        seed=args.seed,
        batch_size=args.batch_size,
        no_condition=args.no_condition,
    )
    from . import train

    train.train(cfg, Path(args.out), force=args.force)
    return 0


def _cmd_hls(args: argparse.Namespace) -> int:
    from . import firmware

    paths = firmware.convert_all(Path(args.run) if args.run else None, [Path(c) for c in args.configs], Path(args.out))
    bad = {p.name: n for p in paths if (n := firmware.testbench_mismatches(p))}
    for name, n in bad.items():
        print(f"ecqae: error: {name}: C simulation differs from QKeras on {n:,} testbench latents; "
              "see make verify for where", file=sys.stderr)  # fmt: skip
    return 1 if bad else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import data, verify

    extra = data.read_csv(args.data, eta=args.eta, max_rows=args.data_rows) if args.data else None
    run = Path(args.run) if args.run else None
    ok = verify.verify_all(run, [Path(c) for c in args.configs], Path(args.hls), n_wafers=args.wafers, extra=extra)
    return 0 if ok else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate

    evaluate.evaluate(
        Path(args.run),
        Path(args.out) if args.out else None,
        ablation=Path(args.ablation) if args.ablation else None,
        n_wafers=args.wafers,
    )
    return 0


def _cmd_handoff(args: argparse.Namespace) -> int:
    from . import handoff

    out = Path(args.out) if args.out else Path(args.hls) / "release"
    handoff.make_bundle(Path(args.run), [Path(c) for c in args.configs], Path(args.hls), name=args.name, out_root=out)
    return 0


def _cmd_check_bundle(args: argparse.Namespace) -> int:
    from . import handoff

    return 0 if handoff.check_bundle(Path(args.path)) else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    out = Path(args.out)
    report = bench.run(args.wafers, out, scaling=args.scaling, smoke=args.smoke, chain=args.chain, reps=args.reps)
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecqae", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    # --debug is accepted after the subcommand too
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the conditional autoencoder", parents=[common])
    t.add_argument("--config", help="YAML run config (data/model/train sections); flags override it")
    t.add_argument("--data", help="'embedded' (default) or a CALQ CSV path (.csv or .csv.gz)")
    t.add_argument("--eta", help="CSV eta: a column name, a value '2.2' or a range '1.6:2.9' (default: column 'eta')")
    t.add_argument(
        "--wafers", type=int, help="embedded: wafers to generate (0 = 200,000); CSV: at most this many rows (0 = all)"
    )
    t.add_argument("--epochs", type=int)
    t.add_argument("--elinks", type=int, help="e-link budget; sets the latent bit width (2->3, 3->5, 4->7, 5+->9)")
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--no-condition", action="store_true", help="plain autoencoder: decoder ignores sum and eta")
    t.add_argument("--out", default="runs/default", help="run directory")
    t.add_argument("--force", action="store_true", help="retrain even if the run directory is complete")
    t.set_defaults(func=_cmd_train)

    h = sub.add_parser(
        "hls", help="convert the trained encoder to HLS projects and compile the C simulation", parents=[common]
    )
    h.add_argument("--run", help="run directory (default: the config's 'run', else runs/default)")
    h.add_argument("--out", default="hls")
    h.add_argument("configs", nargs="+", help="firmware config YAML files")
    h.set_defaults(func=_cmd_hls)

    v = sub.add_parser("verify", help="prove the C simulation bit-exact against QKeras", parents=[common])
    v.add_argument("--run", help="run directory (default: the config's 'run', else runs/default)")
    v.add_argument("--hls", default="hls")
    v.add_argument("--wafers", type=int, default=0, help="test wafers to compare (0 = the whole test split)")
    v.add_argument("--data", help="extra wafers to compare: a CALQ CSV (.csv or .csv.gz)")
    v.add_argument("--eta", default="2.2", help="eta for --data: a column name, a value or a range LO:HI")
    v.add_argument("--data-rows", type=int, default=0, help="at most this many rows of --data (0 = all)")
    v.add_argument("configs", nargs="+", help="firmware config YAML files")
    v.set_defaults(func=_cmd_verify)

    e = sub.add_parser(
        "evaluate", help="EMD and the field's metrics against the classical algorithms", parents=[common]
    )
    e.add_argument("--run", default="runs/default")
    e.add_argument("--out", default=None, help="output directory (default: <run>/evaluation)")
    e.add_argument("--ablation", help="a plain-autoencoder run (same data and seed) to compare against")
    e.add_argument("--wafers", type=int, default=0, help="test wafers to use (0 = the whole test split)")
    e.set_defaults(func=_cmd_evaluate)

    o = sub.add_parser("handoff", help="write the release bundle for ASIC engineers", parents=[common])
    o.add_argument("--run", default="runs/default")
    o.add_argument("--hls", default="hls")
    o.add_argument("--name", default=None, help="bundle name (default: econt-<run id>)")
    o.add_argument("--out", default=None, help="release directory (default: <hls>/release)")
    o.add_argument("configs", nargs="+")
    o.set_defaults(func=_cmd_handoff)

    c = sub.add_parser(
        "check-bundle", help="re-verify a received release bundle from its files alone", parents=[common]
    )
    c.add_argument("path", help="a release directory or its .tar.gz")
    c.set_defaults(func=_cmd_check_bundle)

    b = sub.add_parser("bench", help="measure speed and memory of every stage", parents=[common])
    b.add_argument("--wafers", type=int, default=100_000)
    b.add_argument("--out", default="bench.json")
    b.add_argument("--scaling", action="store_true", help="also run 1e4, 1e5, 1e6 wafers")
    b.add_argument("--smoke", action="store_true", help="a quick version for CI (at most 1,000 wafers, 2 repetitions)")
    b.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3; smoke 2)")
    b.add_argument("--chain", action="store_true", help="also time 'make' on the embedded default (long)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EcqaeError as exc:
        if args.debug:
            raise
        print(f"ecqae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecqae: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen environment problem: still one line
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"ecqae: error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3
