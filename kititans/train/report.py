"""Training curves from metrics.jsonl: loss and val loss, learning rate, grad norm, tokens/s (and MFU when the
device's peak is known) as one PNG and a self-contained HTML page with the same plots (SVG) and a summary.
`kititans report RUN` writes RUN/report/training.{png,html}; `kititans train` writes it when it ends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.files import atomic_path, write_text
from kititans.htmlpage import esc, page, pyplot, svg, table


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, validation rows) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise KititansError(f"{run_dir}: no metrics.jsonl (is this a run directory that has trained?)")
    train, val = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise KititansError(f"{path}:{n}: not valid JSON") from None
        (val if "val_loss" in row else train).append(row)
    if not train and not val:
        raise KititansError(f"{path}: no rows yet")
    return train, val


PANELS = (
    ("loss", "loss", ("loss", "val_loss"), False),
    ("learning rate", "lr", ("lr",), False),
    ("grad norm", "grad norm", ("grad_norm",), True),
    ("throughput", "tokens/s", ("tokens_per_s",), False),
    ("MFU", "MFU", ("mfu",), False),
)


def _figure(plt: Any, train: list[dict], val: list[dict], panels: list[tuple]) -> Any:
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.3 * rows), squeeze=False)
    for ax, (title, ylabel, keys, logy) in zip(axes.flat, panels):
        for key in keys:
            src = val if key.startswith("val") else train
            pts = [(r["step"], r[key]) for r in src if isinstance(r.get(key), (int, float))]
            if pts:
                style = {"marker": "o", "ms": 3} if key.startswith("val") else {"lw": 1.2}
                ax.plot(*zip(*pts), label=key.replace("_", " "), **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def summary_rows(train: list[dict], val: list[dict]) -> list[list[str]]:
    last = train[-1] if train else {}
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    rows = [["steps", f"{last.get('step', 0):,}"]]
    if "tokens" in last:
        rows.append(["tokens seen", f"{last['tokens']:,}"])
    if "time" in last:
        rows.append(
            ["wall time", f"{last['time'] / 3600:.2f} h" if last["time"] > 3600 else f"{last['time']:.0f} s"]
        )
    if "loss" in last:
        rows.append(["last train loss", f"{last['loss']:.4f}"])
    if val:
        rows.append(["last val loss", f"{val[-1]['val_loss']:.4f} (step {val[-1]['step']})"])
        rows.append(["best val loss", f"{best['val_loss']:.4f} (step {best['step']})"])
    tps = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if tps:
        rows.append(["median tokens/s", f"{sorted(tps)[len(tps) // 2]:,.0f}"])
    mfu = [r["mfu"] for r in train if "mfu" in r]
    if mfu:
        rows.append(["median MFU", f"{sorted(mfu)[len(mfu) // 2]:.1%}"])
    return rows


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """RUN/report/training.png and training.html (needs matplotlib: kititans[bench])."""
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    try:
        plt = pyplot()
    except ImportError:
        raise KititansError(
            "the training report draws with matplotlib: pip install 'kititans[bench]'"
        ) from None
    present = {k for r in train + val for k in r}
    panels = [p for p in PANELS if any(k in present for k in p[2])]
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    fig = _figure(plt, train, val, panels)
    with atomic_path(out / "training.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    body = (
        f"<h1>Training: {esc(run_dir.name)}</h1><div class='sub'>{esc(run_dir.resolve())}</div>"
        + table(["", "value"], summary_rows(train, val), numeric_from=1, color_col=None)
        + f"<figure class='wide'>{svg(fig)}<figcaption>from metrics.jsonl</figcaption></figure>"
    )
    write_text(out / "training.html", page(f"kititans training report: {run_dir.name}", body))
    return {"png": out / "training.png", "html": out / "training.html"}
