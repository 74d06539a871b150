"""The compiled paths in the default test run (compile=auto turns torch.compile on for every CUDA run and for
CPU models from 10M parameters): a compiled training step equals the eager one, and a compiled Titans decode
(block mac, the kind that once shipped wrong logits) equals the parallel forward. Debug sizes, a few steps."""

from __future__ import annotations

import torch

from tests.train.workers import lm_steps, uneven_chats

ONE_LAYER = {"n_layers": 1}


def test_a_compiled_training_step_equals_the_eager_one(tmp_path, one_thread):
    kw = dict(model=ONE_LAYER, batches=uneven_chats)
    eager = lm_steps(str(tmp_path / "eager"), 4, 2, 2, **kw)
    compiled = lm_steps(str(tmp_path / "compiled"), 4, 2, 2, **kw, **{"train.compile": "on"})
    for a, b in zip(compiled["loss"], eager["loss"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)  # inductor fuses differently: fp32 agreement to 1e-4
    for name, g in eager["grads"][0].items():
        torch.testing.assert_close(compiled["grads"][0][name], g, rtol=1e-3, atol=1e-5)


def test_a_compiled_titans_decode_equals_the_parallel_forward(one_thread):
    from kititans.models.titans.model import SPEC

    torch.manual_seed(0)
    model = SPEC.build(
        SPEC.make_config("titans-debug", {"block": "mac", "n_layers": 1, "memory_layers": [1]})
    )
    model.eval()
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        full = model(x)
        model.fuse_for_inference().compile_decode()
        state = model.new_state(1)
        out = torch.cat(
            [model(x[:, :4], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(4, 7)], 1
        )
    assert set(model._compiled) == {"decode"}  # three tokens inside one memory chunk: one compiled kind
    assert (out - full).abs().max() < 1e-4
