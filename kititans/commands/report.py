"""kititans report: a run's training curves (loss, val loss, lr, grad norm, tokens/s, MFU) as PNG + HTML."""

from __future__ import annotations

import argparse

HELP = "draw a run's training curves (loss, val loss, lr, grad norm, tokens/s) as a PNG and an HTML page"
EXAMPLES = """  kititans report runs/mine            # -> runs/mine/report/training.png and training.html
  kititans report runs/big             # while it trains: the curves so far (kititans train writes it at the end)"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory (with metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kititans.errors import KititansError
    from kititans.train.report import write_report

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise KititansError(f"no such run directory: {run_dir}")
    paths = write_report(run_dir)
    print(f"wrote {paths['png']}")
    print(f"wrote {paths['html']}")
    return 0
