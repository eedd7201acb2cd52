"""Console script `tspin`: generate | train | iterate | demo.

    tspin iterate --config configs/zephyr-7b-ultrachat.yaml --num_iterations=5 --output_dir=runs/z
    tspin train --config recipe.yaml --method=sft --resume
    tspin generate --config recipe.yaml --out gen.jsonl
    tspin demo --out runs/demo

Any config key can be given as `--key=value` (or `--key value`); it overrides the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import FIELDS, load_config


def _config_help() -> str:
    return "config keys (--key=value):\n" + "\n".join(
        f"  --{name:<28} {f.metadata.get('help', '')} [default: {_default(f)}]" for name, f in FIELDS.items())


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> dict:
    out: dict = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            parser.error(f"unexpected argument {arg!r} (config overrides look like --key=value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                typ_bool = key in FIELDS and FIELDS[key].type in ("bool", bool)
                if not typ_bool:
                    parser.error(f"--{key}: missing value (use --{key}=VALUE)")
                value = "true"
            else:
                i += 1
                value = rest[i]
        out[key] = value
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tspin", description="T-SPIN / SPIN / SFT self-play fine-tuning.",
                                epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("generate", "sample responses for a data file with the configured model"),
                       ("train", "one training run (sft / tspin / spin) on a data file"),
                       ("iterate", "the whole self-play loop: proto once, then generate -> train -> evaluate"),
                       ("demo", "the embedded T-SPIN vs SPIN vs SFT comparison (tiny Llama, CPU, ~10 min)")):
        sp = sub.add_parser(name, help=text, description=text, epilog=_config_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "demo":
            sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
            sp.add_argument("--quick", action="store_true", help="smoke-sized demo (seconds, for tests)")
            sp.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
            sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
            sp.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
            continue
        sp.add_argument("--config", help="YAML recipe (see configs/)")
        if name in ("train", "iterate"):
            sp.add_argument("--resume", action="store_true", help="continue the run in output_dir after a stop")
        if name == "generate":
            sp.add_argument("--out", required=True, help="output JSONL (written atomically, resumable)")
            sp.add_argument("--field", default="generated", help="field to write the responses to (generated/proto)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"demo: unrecognized arguments: {' '.join(rest)}")
        from .demo import run_demo

        try:
            run_demo(args.out, quick=args.quick, resume=args.resume, progress=not args.no_progress,
                     threads=args.threads)
        except (FileExistsError, ValueError) as e:
            print(f"tspin demo: error: {e}", file=sys.stderr)
            return 2
        return 0
    overrides = _split_overrides(rest, parser)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"tspin {args.command}: error: {e}", file=sys.stderr)
        return 2
    from . import selfplay
    from .ranks import is_main

    try:
        if args.command == "generate":
            path = selfplay.generate(cfg, args.out, args.field)
            print(f"wrote {path}")
        elif args.command == "train":
            r = selfplay.train(cfg, resume=args.resume)
            if is_main():  # under torchrun every rank holds the same result
                print(r)
        else:
            s = selfplay.iterate(cfg, resume=args.resume)
            for e in s["evals"] if is_main() else []:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()})
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"tspin {args.command}: error: {e}", file=sys.stderr)
        return 2
    from .distributed import cleanup_distributed

    cleanup_distributed()  # under torchrun: leave the process group together (on errors, torchrun ends the rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
