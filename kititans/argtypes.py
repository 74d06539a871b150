"""argparse value types shared by the commands and the bench pack's torch-free runner (so it imports nothing
else of the package): comma-separated positive integers, positive and non-negative integers."""

from __future__ import annotations

import argparse


def int_list(value: str) -> tuple[int, ...]:
    """ "128,512" -> (128, 512); every value >= 1."""
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def nonneg_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n
