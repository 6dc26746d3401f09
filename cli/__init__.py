"""The `xlaserve` command line: pull, generate, serve, convert, eval, bench, lower, train-draft.

One module per command, each with `register(sub)` adding its subparser (and `func`); what several
commands share lives in common.py. Heavy imports (JAX, LLM, evals) stay inside the command
functions, so `xlaserve pull` and `--help` do not start JAX."""

from __future__ import annotations

import argparse
import sys

from xlaserve import __version__
from xlaserve.checkpoints import registry
from xlaserve.cli import bench, convert, generate, lower, pull, serve, train_draft
from xlaserve.cli import eval as eval_command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; given the command being run, one that imports only what that command needs."""
    parser = argparse.ArgumentParser(prog="xlaserve", description="JAX/XLA-compiled LLM inference")
    parser.add_argument("--version", action="version", version=f"xlaserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log compile and engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (pull, generate, serve, convert, eval_command, lower, train_draft):
        module.register(sub)
    bench.register(sub, load=command in (None, "bench"))
    return parser


def main(argv=None) -> int:
    import logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm_eval parses its own flags
        return eval_command.cmd_eval(argv[1:])
    # The global flags take no values, so the first word that is not a flag names the command.
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("xlaserve").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from xlaserve.checkpoints.loaded import CheckpointError

    try:
        return args.func(args)
    except (ValueError, CheckpointError, registry.PullError) as e:
        print(f"xlaserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
