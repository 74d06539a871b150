"""Task names, checked against lm-eval's own index before any model is loaded.

Names, groups, tags, glob patterns and YAML paths are lm-eval's (`TaskManager`); `--include-path` folders
add the user's own YAMLs. An unknown name fails in one line with the closest known names. Tasks whose
lm-eval code needs optional packages (the Japanese leaderboard's text normalisation and ROUGE) are checked
up front, so a missing package is named before hours of scoring rather than after.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kititans.errors import KititansError, MissingExtra, require

# task-name prefix -> (python modules its lm-eval code imports, pip names of the packages)
TASK_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ja_leaderboard": (
        ("emoji", "neologdn", "fugashi", "unidic_lite", "rouge_score"),
        "emoji neologdn 'fugashi[unidic-lite]' rouge_score",
    ),
    "japanese_leaderboard": (
        ("emoji", "neologdn", "fugashi", "unidic_lite", "rouge_score"),
        "emoji neologdn 'fugashi[unidic-lite]' rouge_score",
    ),
}


def require_lm_eval() -> Any:
    """lm_eval, or the one-line error naming the extra."""
    mod = require("lm_eval", "eval", "task evaluation (lm-evaluation-harness)")
    # lm-eval logs every task it builds at INFO; KiTitans shows its own progress
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return mod


def task_manager(include_path: Sequence[str | Path] | None = None, builtin: bool = True) -> Any:
    """lm-eval's TaskManager over its built-in tasks (unless `builtin` is False: indexing lm-eval's ~15k
    YAMLs takes seconds) plus the given folders of task YAMLs."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_path or []]
    for p in paths:
        if not p.exists():
            raise KititansError(f"--include-path {p}: no such folder")
    if not builtin and not paths:
        raise KititansError("--no-builtin-tasks needs --include-path folders with your task YAMLs")
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=builtin)


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def resolve_tasks(tm: Any, names: Sequence[str]) -> list[str]:
    """The task specs to hand lm-eval: known names, matches of glob patterns, and existing YAML files."""
    known = set(tm.all_tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            out.append(name)
        elif _is_pattern(name) and (matched := tm.match_tasks([name])):
            out += matched
        else:
            close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise KititansError(
                f"unknown task {name!r}{hint} (list them with: lm-eval ls tasks; your own YAMLs: --include-path)"
            )
    if not out:
        raise KititansError("no task given: name at least one, e.g. --tasks arc_easy")
    check_task_packages(out)
    return list(dict.fromkeys(out))


def check_tasks_build(tm: Any, names: Sequence[str], builtin: bool = True) -> None:
    """Build the tasks once (their YAML, prompts and data) before any model is loaded, so a task lm-eval cannot
    build fails in one line instead of with a traceback after the reference was scored."""
    try:
        tm.load(list(names))
    except KititansError:
        raise
    except Exception as e:  # lm-eval and datasets raise ValueError, KeyError, FileNotFoundError, ...
        text = str(e).strip()
        why = text.splitlines()[0] if text else type(e).__name__
        hint = "" if builtin else " (--no-builtin-tasks: lm-eval's own task YAMLs are not indexed)"
        raise KititansError(f"lm-eval could not build {', '.join(names)}: {why}{hint}") from None


def check_task_packages(names: Sequence[str]) -> None:
    for name in names:
        for prefix, (modules, pip_names) in TASK_PACKAGES.items():
            if not name.startswith(prefix):
                continue
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                raise MissingExtra(
                    f"task {name} needs the packages {', '.join(missing)}: "
                    f"pip install 'kititans[eval]' (or pip install {pip_names})"
                )
