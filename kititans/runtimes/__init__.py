"""Runtimes: token ids in, logits out, for each format (see base.py)."""

from kititans.runtimes.base import RUNTIMES, detect_runtime, load_runtime

__all__ = ["RUNTIMES", "detect_runtime", "load_runtime"]
