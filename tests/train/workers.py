"""Training steps run the same way in one process and on gloo ranks (tests/train/ranks.py), returning each
step's logged loss and the gradients the optimizer saw, so tests compare batch splits and rank counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LENGTHS = [5, 9, 17, 33, 57, 80, 110, 127]  # tokens per chat: a step's micro-batches differ ~20x in length
STEPS = 3


def uneven_chats(step: int, index: int, count: int) -> tuple[torch.Tensor, ...]:
    """Micro-batch `index` of `count` of a step's 8 SFT examples (sorted by length, so micro-batches differ):
    right-padded (x, y, mask) with assistant replies of very different lengths."""
    from kititans.train.sft import collate

    gen = torch.Generator().manual_seed(1000 + step)
    examples = []
    for n in LENGTHS:
        ids = torch.randint(4, 500, (n,), generator=gen)
        reply = max(1, int(n * float(torch.rand((), generator=gen)) * 0.8))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n - reply :] = True
        examples.append((ids, mask))
    b = len(examples) // count
    return collate(examples[index * b : (index + 1) * b], pad_id=0, limit=128)


def _config(out: Path, batch_size: int, accum: int, steps: int, family: str, preset: str, **over: Any) -> Any:
    from kititans.config import RunConfig, apply_overrides

    items = {"family": family, "preset": preset, "out": str(out), "train.batch_size": batch_size,
             "train.grad_accum": accum, "train.steps": steps, "train.seq_len": 128, "train.dtype": "fp32",
             "train.compile": "off", "train.report": False, "train.device": "cpu", "optim.warmup_steps": 0,
             "optim.schedule": "constant", "optim.lr": 1e-5, "optim.grad_clip": 0.0, **over}  # fmt: skip
    return apply_overrides(RunConfig(), list(items.items()))


def _capture(tr: Any) -> list[dict[str, torch.Tensor]]:
    """Record the (full) gradients each time the optimizer steps."""
    grads: list[dict[str, torch.Tensor]] = []
    step = tr.opt.step

    def capturing() -> None:
        grads.append(
            {
                n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                for n, p in tr.model.named_parameters()
                if p.grad is not None
            }
        )
        step()

    tr.opt.step = capturing
    return grads


class PairStoreLike:
    """Pairs of token ids with some positives shared by two queries (false negatives to mask)."""

    columns = ("query", "positive")

    def __init__(self, n: int = 40):
        gen = torch.Generator().manual_seed(7)
        self.rows = {c: [torch.randint(4, 500, (int(torch.randint(4, 20, (), generator=gen)),), generator=gen)
                         .numpy() for _ in range(n)] for c in self.columns}  # fmt: skip
        for i in range(0, n, 5):  # every 5th pair shares its positive with the next pair
            self.rows["positive"][i + 1] = self.rows["positive"][i]

    def __len__(self) -> int:
        return len(self.rows["query"])

    def get(self, column: str, i: int) -> Any:
        return self.rows[column][i]


def lm_steps(out: str, batch_size: int, accum: int, steps: int, family: str = "lite", preset: str = "debug",
             batches: Any = uneven_chats, model: dict | None = None, **over: Any) -> dict[str, Any]:  # fmt: skip
    """`steps` optimizer steps of a fresh model on `batches` ("pairs": contrastive on PairStoreLike): per step
    the logged loss, the supervised and non-padding counts, and the gradients."""
    from kititans.models.spec import get_family
    from kititans.train.loop import Trainer, TrainSetup

    cfg = _config(Path(out), batch_size, accum, steps, family, preset, **over)
    spec = get_family(family)
    mcfg = spec.make_config(preset, model)
    torch.manual_seed(0)
    objective = None
    if batches == "pairs":
        from kititans.train.contrastive import ContrastiveObjective, PairBatches

        batches, objective = PairBatches(PairStoreLike(), batch_size, 0, 0), ContrastiveObjective(0.05)
    setup = TrainSetup(spec=spec, model_config=mcfg, model=spec.build(mcfg), tokenizer=None,  # type: ignore[arg-type]
                       train_batch=batches, eval_batches=[], objective=objective)  # fmt: skip
    tr = Trainer(cfg, setup, Path(out), resume=False, progress=False)
    grads = _capture(tr)
    losses, counts = [], []
    for _ in range(steps):
        loss, supervised, _, tokens = tr.optimizer_step()
        losses.append(float(tr.dist.sum(loss)) / supervised)
        counts.append((supervised, tokens))
    tr.close()
    return {"loss": losses, "counts": counts, "grads": grads if tr.dist.main else None}


def fsdp_titans_reads(out: str, block: str = "mal") -> dict[str, Any]:
    """Titans under FSDP2 in bf16: the dtypes the memory's and the attention's weights have when their
    forward runs, and one training step's loss."""
    from kititans.models.titans.model import SPEC
    from kititans.train.loop import Trainer, TrainSetup

    cfg = _config(Path(out), 2, 1, 1, "titans", "titans-debug", **{"train.dtype": "bf16", "train.parallel": "fsdp",
                                                                    "train.seq_len": 32})  # fmt: skip
    mcfg = SPEC.make_config("titans-debug", {"block": block})
    torch.manual_seed(0)
    model = SPEC.build(mcfg)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 512, (4, 33), generator=gen)

    def batch(step: int, index: int, count: int) -> tuple[torch.Tensor, ...]:
        rows = data[index * 2 : (index + 1) * 2]
        return rows[:, :-1], rows[:, 1:]

    setup = TrainSetup(spec=SPEC, model_config=mcfg, model=model, tokenizer=None,  # type: ignore[arg-type]
                       train_batch=batch, eval_batches=[])  # fmt: skip
    tr = Trainer(cfg, setup, Path(out), resume=False, progress=False)
    seen: dict[str, str] = {}
    layer = next(m for m in tr.model.layers if m.memory is not None)

    def record(name: str, get: Any) -> Any:
        def hook(_mod: Any, _args: Any) -> None:
            for k, t in get().items():
                seen[f"{name}.{k}"] = str(t.dtype)

        return hook

    layer.memory.register_forward_pre_hook(
        record(
            "memory",
            lambda: {
                "w1": layer.memory.w1,
                "proj": layer.memory.proj.weight,
                "gates": layer.memory.gates.weight,
            },
        )
    )
    layer.attn.register_forward_pre_hook(record("attn", lambda: {"qkv": layer.attn.qkv.weight}))
    loss, supervised, _, _ = tr.optimizer_step()
    value = float(tr.dist.sum(loss)) / supervised
    stored = {n: str(p.dtype) for n, p in tr.model.named_parameters() if ".memory." in n}
    tr.close()
    return {"seen": seen, "loss": value, "stored": stored}


def on_two_ranks(out: str) -> dict[str, Any]:
    """Everything the rank tests need from one spawn of 2 gloo ranks (a spawn costs seconds of imports)."""
    base = Path(out)
    return {
        "sft": lm_steps(str(base / "sft"), 2, 2, STEPS),  # 2 ranks x 2 accumulation x 2 (DDP)
        "pairs": lm_steps(str(base / "pairs"), 2, 2, STEPS, "encoder", "encoder-debug", "pairs"),
        "fsdp": fsdp_titans_reads(str(base / "fsdp")),
    }
