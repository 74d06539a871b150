"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class KititansError(Exception):
    """A problem with the user's input, files or environment; the message says what to do."""


class UnsupportedExport(KititansError):
    """A (family, format) or (format, quantization) pair that cannot work, with the reason and alternatives."""


class MissingExtra(KititansError):
    """An optional package is not installed."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional package or raise MissingExtra naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(
            f"{purpose} needs the '{module.split('.')[0]}' package ({e}): pip install 'kititans[{extra}]'"
        ) from None
