"""Fixtures for the eval tests: lm-eval on the small local task YAMLs of tests/eval/tasks (never a download),
a copy of the session's debug runs with the exports these tests score."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "tasks"


def ja_tasks_dir() -> Path:
    """lm-eval's own Japanese leaderboard task folder (kt_ja_local overrides its jcommonsenseqa's data)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "japanese_leaderboard"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Datasets read from tests/eval/tasks (data_files resolve from the current directory), no hub access,
    a private datasets cache; undone at the end of the module."""
    import datasets.config

    mp = pytest.MonkeyPatch()
    mp.chdir(TASKS)
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    yield TASKS
    mp.undo()


@pytest.fixture(scope="session")
def tm():
    """A TaskManager over the test tasks and lm-eval's Japanese leaderboard folder only (indexing all of
    lm-eval's ~15k YAMLs takes seconds)."""
    from kititans.eval.tasks import task_manager

    return task_manager([TASKS, ja_tasks_dir()], builtin=False)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "checkpoints", "bench", "eval"))
    return dst


@pytest.fixture(scope="session")
def lite(debug_run, tmp_path_factory) -> Path:
    """A copy of the session's Lite debug run with GGUF f32 / q4_0 and ONNX fp32 exports in RUN/export."""
    from kititans.export import ExportOptions, export_model

    run = copy_run(debug_run, tmp_path_factory.mktemp("eval") / "lite")
    opts = ExportOptions(progress=False)
    for fmt, q in (("gguf", "f32"), ("gguf", "q4_0"), ("onnx", "fp32")):
        export_model(run, fmt, q, options=opts)
    return run


@pytest.fixture(scope="session")
def titans(titans_run, tmp_path_factory) -> Path:
    """A copy of the session's Titans debug run with an ONNX fp32 export."""
    from kititans.export import ExportOptions, export_model

    run = copy_run(titans_run, tmp_path_factory.mktemp("eval") / "titans")
    export_model(run, "onnx", "fp32", options=ExportOptions(progress=False))
    return run


def evaluate(lm, tm, tasks, **kw):
    """lm_eval.simple_evaluate with per-sample logs, no bootstrap (fast)."""
    import lm_eval

    kw.setdefault("bootstrap_iters", 0)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, **kw)


def per_item(res, task):
    """Every response of every logged sample of `task`, flattened (log-likelihoods, or generated text)."""
    out = []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        for r in s["resps"]:
            v = r[0]
            out.append(v[0] if isinstance(v, (list, tuple)) else v)
    return out
