"""Console script `tspin`: generate | train | iterate | demo | study.

    tspin iterate --config configs/zephyr-7b-ultrachat-tspin.yaml --num_iterations=5 --output_dir=runs/z
    tspin train --config recipe.yaml --method=sft --resume
    tspin generate --config recipe.yaml --out gen.jsonl
    tspin demo --out runs/demo
    tspin study --out runs/study --jobs 2

Any config key can be given as `--key=value` (or `--key value`); it overrides the YAML file.
`tspin <command> --help` lists every key with its help text and default.

Expected failures (a bad setting, a missing or malformed file, a full or read-only disk, an unknown device, a run
whose loss went non-finite, out of memory) end with one line on stderr naming the key, file, path or device, and a
non-zero exit: 2 for what is wrong in the command, its config or its inputs, 1 for a failure while running. Pass
`--debug` to see the traceback instead. SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) end a command the same
way: one line saying how to continue, exit 130 / 143; what was written stays resumable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .config import config_from_args, config_keys, read_yaml

COMMANDS = {
    "generate": "sample responses for a data file with the configured model",
    "train": "one training run (sft / tspin / spin) on a data file",
    "iterate": "the whole self-play loop: proto once, then generate -> train -> evaluate",
    "demo": "the embedded T-SPIN vs SPIN vs SFT comparison, one seed (tiny Llama, CPU, under 10 min)",
    "study": "the demo's comparison, pre-registered: a validation grid, main and stability seeds, pooled tests, "
             "verdicts",
}


class _Parser(argparse.ArgumentParser):
    """argparse reports some errors (a missing required argument) by printing the usage and exiting, whatever
    exit_on_error says: raise them instead, so that main() prints them as one line like every other error."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, f"{message} (see `{self.prog} --help`)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the `tspin` parser, its subcommand parsers by name). Errors raise argparse.ArgumentError (exit_on_error off),
    so that main() reports them like every other error."""
    p = _Parser(prog="tspin", description="T-SPIN / SPIN / SFT self-play fine-tuning.",
                                epilog="`tspin <command> --help` lists every config key.", exit_on_error=False)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {}
    for name, text in COMMANDS.items():
        if name in ("demo", "study"):
            sp = sub.add_parser(name, help=text, description=text, exit_on_error=False)
            sp.add_argument("--out", default=f"runs/{name}", help=f"output directory (default runs/{name})")
            sp.add_argument("--quick", action="store_true", help=f"smoke-sized {name} (seconds, for tests)")
            sp.add_argument("--no-progress", action="store_true", help="hide progress bars and lines")
            sp.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
            sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
            sp.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process "
                                                                "(default 1; 2 on a free 2-core machine)")
            if name == "demo":
                sp.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
                sp.add_argument("--seed", type=int, default=0, help="the seed's own prompts, 25%% subset, data order "
                                                                    "and samples (the pretrained base is shared)")
                sp.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                                help="who samples: auto (vLLM when it is installed, else HF generate), hf, or vllm")
        else:
            flags = {"generate": " --out OUT [--field FIELD]", "train": " [--resume]", "iterate": " [--resume]"}[name]
            sp = sub.add_parser(name, help=text, description=text, parents=[config_keys()], allow_abbrev=False,
                                usage=f"tspin {name} [--config YAML] [--KEY=VALUE ...]{flags}", exit_on_error=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Config keys may also come from --config; the command line overrides it.")
            sp.add_argument("--config", help="YAML recipe (see configs/)")
            sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
            if name in ("train", "iterate"):
                sp.add_argument("--resume", action="store_true", help="continue the run in output_dir after a stop")
                sp.add_argument("--overwrite", action="store_true",
                                help="start afresh in output_dir: delete the files a tspin run wrote there (nothing "
                                     "else), or use a non-empty folder that is not a run, beside its files")
            if name == "generate":
                sp.add_argument("--out", required=True, help="output JSONL (written atomically, resumable)")
                sp.add_argument("--field", default="generated", help="field to write the responses to "
                                                                     "(generated/proto)")
        commands[name] = sp
    return p, commands


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the command's arguments, unrecognised ones). The YAML recipe named by --config becomes the defaults of the
    config keys, so the command line overrides it and both pass the same conversions."""
    parser, commands = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config", None):
        commands[args.command].set_defaults(**read_yaml(args.config))
        args, rest = parser.parse_known_args(argv)
    return args, rest


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt: the same unwinding (temp files
    removed by their writers, nothing half-written), a message and exit 143."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once, as a second Ctrl-C
    raise Terminated()


def _how_to_continue(command: str) -> str:
    return {"tspin train": "run the same command with --resume to continue",
            "tspin iterate": "run the same command with --resume to continue",
            "tspin generate": "run the same command again to continue",
            "tspin demo": "run the same command with --resume to continue",
            "tspin study": "run the same command again to continue"}.get(command, "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = f"tspin {argv[0]}" if argv and argv[0] in COMMANDS else "tspin"
    debug = "--debug" in argv  # known before parsing, so that a parse error can show its traceback too
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return _main(argv, command, debug)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], command: str, debug: bool) -> int:
    try:
        args, rest = parse(argv)
        if args.command in ("demo", "study"):
            if rest:
                raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
            if args.jobs < 1 or args.threads < 1:
                raise ValueError("--jobs and --threads must be >= 1")
            if args.command == "demo":
                from .experiments.demo import run_demo

                run_demo(args.out, quick=args.quick, resume=args.resume, progress=not args.no_progress,
                         threads=args.threads, processes=args.jobs, seed=args.seed,
                         backend=args.backend)
            else:
                from .experiments.study import run_study

                # seeds, grid and tests are the pre-registered design's (tspin.experiments.preregistration)
                run_study(args.out, processes=args.jobs, threads=args.threads, quick=args.quick,
                          progress=not args.no_progress)
            return 0
        cfg = config_from_args(args, rest)
        _run(args, cfg)
    except Exception as e:
        code = _exit_code(e)
        if debug or code is None:  # asked for, or not a failure we expect: a bug to report, with its traceback
            raise
        from .ranks import world

        rank, world_size = world()  # under torchrun every rank says what stopped it
        _say(f"{command}: error: {f'[rank {rank}] ' if world_size > 1 else ''}{_one_line(e)}")
        return code
    except KeyboardInterrupt as e:
        if debug:
            raise
        how = _how_to_continue(command)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        _say(f"{command}: {what}{'; ' + how if how else ''}")
        return 143 if isinstance(e, Terminated) else 130
    from .ranks import cleanup_distributed

    cleanup_distributed()  # under torchrun: leave the process group together (on errors, torchrun ends the rest)
    return 0


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun the ranks share the pipe, and print()'s separate writes of the
    text and its newline let two ranks' lines run together (pipes keep a single write under 4 KiB whole)."""
    sys.stderr.flush()
    data = (line + "\n").encode(errors="replace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (captured in-process): no descriptor to share
        sys.stderr.write(line + "\n")
        return
    while data:  # a long line may go out in parts; the loop keeps it whole on our side
        data = data[os.write(fd, data):]


def _exit_code(e: Exception) -> int | None:
    """2: the command, its config or its inputs are wrong; 1: a failure while running; None: unexpected."""
    import torch

    from .experiments.jobs import WorkerDiedError
    from .train import NonFiniteError

    if isinstance(e, (torch.OutOfMemoryError, NonFiniteError, WorkerDiedError)):
        return 1
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return 2
    if isinstance(e, OSError):  # no space, permissions, read-only file system, I/O errors
        return 1
    if isinstance(e, (argparse.ArgumentError, ValueError)):
        return 2
    return None


def _one_line(e: BaseException) -> str:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return (f"out of memory: {str(e).splitlines()[0]} (lower per_device_train_batch_size, generation_batch_size "
                "or eval_batch_size, or set gradient_checkpointing=true)")
    if isinstance(e, OSError) and e.strerror:  # "[Errno 28] ..." reads worse than the reason and the path
        text = e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())  # one line: some libraries' messages span several


def _run(args: argparse.Namespace, cfg) -> None:
    from . import selfplay
    from .ranks import is_main

    if args.command == "generate":
        print(f"wrote {selfplay.generate(cfg, args.out, args.field)}")
    elif args.command == "train":
        r = selfplay.train(cfg, resume=args.resume, overwrite=args.overwrite)
        if is_main():  # under torchrun every rank holds the same result
            print(r)
    else:
        s = selfplay.iterate(cfg, resume=args.resume, overwrite=args.overwrite)
        for e in s["evals"] if is_main() else []:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()})


if __name__ == "__main__":
    sys.exit(main())
