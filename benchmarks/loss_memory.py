"""Peak memory of one training step on CPU: the old loss (full fp32 logits, `lite.lm_loss`) against the new one
(head + loss chunk by chunk, `kititans.train.loss.LMLoss`), and the same step with no LM loss at all
(a sum of the hidden states) as the floor, so the loss's own extra memory is old - floor vs new - floor.

usage: python -m benchmarks.loss_memory [--cases lite-42m:32000,lite-42m:65024,titans-tiny:32000,titans-tiny:65024]
         [--batch 4 --seq 512] [--out bench_out/loss_memory]
Each (model, vocab, loss) runs in fresh processes (--repeats, median): build the model (fp32), draw one batch,
reset the peak resident set (/proc/self/clear_refs), run forward + backward; peak RSS minus RSS before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LOSSES = ("floor", "old", "new")


def one(preset: str, vocab: int, loss: str, batch: int, seq: int) -> dict[str, float]:
    """One step in this process: {"before": bytes, "peak": bytes}."""
    import torch

    from kititans.models.spec import find_preset
    from kititans.train.loss import LMLoss
    from kititans.train.memory import reset_rss_peak, rss_bytes, rss_peak_bytes

    torch.set_num_threads(2)
    spec, p = find_preset(preset)
    torch.manual_seed(0)
    model = spec.build(spec.make_config(p.name, {"vocab_size": vocab, "context_length": max(seq, 256)}))
    x = torch.randint(0, vocab, (batch, seq + 1))
    batch_ = (x[:, :-1], x[:, 1:])
    before = rss_bytes()
    assert reset_rss_peak(), "needs Linux /proc/self/clear_refs"
    if loss == "floor":
        out = model(batch_[0], hidden=True).float().pow(2).mean()
    elif loss == "old":
        from kititans.models.lite import lm_loss

        out = lm_loss(model(batch_[0]), batch_[1])
    else:
        out = (
            LMLoss()(model, batch_, torch.device("cpu"), torch.autocast("cpu", enabled=False))
            / batch_[1].numel()
        )
    out.backward()
    return {"before": before, "peak": rss_peak_bytes(), "loss": float(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="lite-42m:32000,lite-42m:65024,titans-tiny:32000,titans-tiny:65024")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per measurement (the median is kept)"
    )
    ap.add_argument("--out", default="bench_out/loss_memory")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # preset:vocab:loss, in a child process
    args = ap.parse_args()
    if args.one:
        preset, vocab, loss = args.one.split(":")
        print(json.dumps(one(preset, int(vocab), loss, args.batch, args.seq)))
        return
    from benchmarks.common import machine, md_table, write_json

    rows = []
    for case in args.cases.split(","):
        preset, vocab = case.split(":")
        got, step = {}, {}
        for loss in LOSSES:
            cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--one", f"{case}:{loss}",
                   "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
            runs = []
            for _ in range(args.repeats):
                r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            got[loss] = runs[0]
            step[loss] = statistics.median((v["peak"] - v["before"]) / 2**20 for v in runs)
        extra_old, extra_new = step["old"] - step["floor"], step["new"] - step["floor"]
        rows.append({"model": preset, "vocab": int(vocab), "tokens": args.batch * args.seq,
                     "step MB (no loss)": round(step["floor"]), "step MB old": round(step["old"]),
                     "step MB new": round(step["new"]), "loss extra MB old": round(extra_old),
                     "loss extra MB new": round(extra_new), "extra old/new": round(extra_old / max(extra_new, 1), 1),
                     "loss old": round(got["old"]["loss"], 5), "loss new": round(got["new"]["loss"], 5)})  # fmt: skip
        print(md_table(rows[-1:], list(rows[-1])), flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(Path(args.out) / "summary.json", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
