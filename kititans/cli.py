"""The `kititans` command. One COMMANDS table; each verb lives in kititans/commands/<verb>.py with
HELP (one line), EXAMPLES, configure(parser) and run(args). Nothing heavy is imported to build the parser."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import kititans

COMMANDS = {
    "data": "kititans.commands.data",
    "tokenizer": "kititans.commands.tokenizer",
    "train": "kititans.commands.train",
    "sft": "kititans.commands.sft",
    "qat": "kititans.commands.qat",
    "distill": "kititans.commands.distill",
    "report": "kititans.commands.report",
    "generate": "kititans.commands.generate",
    "chat": "kititans.commands.chat",
    "embed": "kititans.commands.embed",
    "search": "kititans.commands.search",
    "index": "kititans.commands.index",
    "eval-retrieval": "kititans.commands.eval_retrieval",
    "train-retriever": "kititans.commands.train_retriever",
    "export": "kititans.commands.export",
    "bench": "kititans.commands.bench",
    "serve": "kititans.commands.serve",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="kititans",
        description="Train small chat language models and ship them to llama.cpp, ONNX Runtime and CoreML.",
        epilog="First run:  kititans train  (built-in corpus, tiny preset, a few minutes on a laptop CPU)",
    )
    parser.add_argument("--version", action="version", version=f"kititans {kititans.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, modpath in COMMANDS.items():
        try:
            mod = importlib.import_module(modpath)
        except ModuleNotFoundError as e:
            if e.name == modpath:
                continue  # a verb not built yet
            raise
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=f"{mod.HELP}\n\nexamples:\n{mod.EXAMPLES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # before torch loads: spinning OpenMP threads make shared 2-core machines 3-4x slower
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for verbs that relaunch themselves (--nproc)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("kititans").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    from kititans.errors import KititansError

    try:
        return int(args._run(args) or 0)
    except KititansError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
