"""Session save/load time and file size (kititans/runtimes/session.py) for titans-tiny and titans-500m.

    python benchmarks/titans_session.py                       # both, 5 repetitions each, median
    python benchmarks/titans_session.py --presets titans-tiny --reps 9 --json out.json

titans-tiny: a random-weight run saved to a temp folder and loaded by the torch runtime, a 300-token prompt,
then save_session / load_session (into a second runtime) on a real file. titans-500m: computed, not trained:
the model is built on the meta device (no weights), its fp32 state is made from `state_spec` with random
values, and the same runtime methods and session functions save and load it. The file size is the state's
(it does not grow with the conversation: the token list adds 8 bytes per token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from kititans.models.spec import find_preset
from kititans.runtimes.pytorch import TorchRuntime
from kititans.runtimes.session import load_session, save_session


class ComputedRuntime(TorchRuntime):
    """The torch runtime's session methods over a model built on the meta device (no weights) and a random
    state of its shape: what a session of that configuration costs, without a checkpoint."""

    def __init__(self, preset: str, pos: int):
        spec, p = find_preset(preset)
        cfg = spec.make_config(p.name, {})
        with torch.device("meta"):
            self.model = spec.build(cfg)
        self.model.embed.weight = torch.nn.Parameter(torch.empty(0))  # state_spec's dtype, state's device
        self.ckpt = SimpleNamespace(spec=spec, path=None)
        self.device, self.dtype, self.name = torch.device("cpu"), "fp32", "torch"
        self._weights_sha256 = f"computed-{preset}"
        g = torch.Generator().manual_seed(0)
        tensors = [torch.tensor([pos])]
        tensors += [torch.randn(shape, generator=g).to(dt) for _, shape, dt in self.model.state_spec(1)[1:]]
        self.state = self.model.state_from_tensors(tensors)


def real_runtime(preset: str, work: Path, pos: int) -> TorchRuntime:
    from kititans.checkpoint import save_checkpoint
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import train_tokenizer

    spec, p = find_preset(preset)
    cfg = spec.make_config(p.name, {})
    tok = train_tokenizer(generate_corpus(0, 3_000_000), work / "tok", cfg.vocab_size)
    torch.manual_seed(0)
    run = save_checkpoint(work / preset, spec.build(cfg).eval(), spec, cfg, tok)
    rt = TorchRuntime(run)
    rt.forward(np.random.default_rng(0).integers(3, 500, pos).tolist())
    return rt


def measure(preset: str, reps: int, work: Path) -> dict:
    pos = 300
    computed = preset != "titans-tiny"
    a = ComputedRuntime(preset, pos) if computed else real_runtime(preset, work, pos)
    b = ComputedRuntime(preset, 0) if computed else TorchRuntime(a.ckpt.path)
    a.session_identity()  # the weights hash is computed once per runtime, not per save
    b._weights_sha256 = a._weights_sha256
    tokens = list(range(pos))
    path = work / f"{preset}.state"
    save_s, load_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        save_session(a, path, tokens, {"messages": []})
        save_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_session(b, path)
        load_s.append(time.perf_counter() - t0)
    state = a.get_state()
    return {
        "computed": computed,
        "file_bytes": path.stat().st_size,
        "state_floats": int(sum(v.size for k, v in state.items() if k != "pos")),
        "save_ms": 1e3 * statistics.median(save_s),
        "load_ms": 1e3 * statistics.median(load_s),
        "tensors": len(state),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="titans-tiny,titans-500m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res: dict = {"reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            res[preset] = measure(preset, args.reps, Path(tmp))
    res["load_average"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    r = main(sys.argv[1:])
    for k, v in r.items():
        if isinstance(v, dict):
            print(
                f"{k}{' (computed)' if v['computed'] else ''}: {v['file_bytes'] / 2**20:.2f} MiB "
                f"({v['state_floats']:,} state values, {v['tensors']} tensors), save {v['save_ms']:.1f} ms, "
                f"load {v['load_ms']:.1f} ms"
            )
    print(f"load average {tuple(round(x, 2) for x in r['load_average'])}, {r['reps']} repetitions (median)")
