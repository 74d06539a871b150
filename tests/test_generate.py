from __future__ import annotations

import numpy as np
import pytest

from kititans.generate import Generation, Sampler, SamplingConfig, generate_text, stream_text
from kititans.runtimes import load_runtime


def test_greedy_and_seeded_sampling():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert Sampler(SamplingConfig(temperature=0))(logits) == 1
    a = [Sampler(SamplingConfig(seed=5))(logits) for _ in range(3)]
    s = Sampler(SamplingConfig(seed=5))
    assert [s(logits) for _ in range(3)][0] == a[0]
    draws = Sampler(SamplingConfig(seed=1, top_k=2, top_p=1.0, temperature=1.0))
    assert {draws(logits) for _ in range(200)} == {1, 3}


def test_top_p_min_p_and_repetition_penalty():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingConfig(seed=0, top_k=0, top_p=0.7, temperature=1.0))
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = Sampler(SamplingConfig(seed=0, top_k=0, top_p=1.0, min_p=0.35, temperature=1.0))
    assert {s(logits) for _ in range(300)} == {0, 1}
    greedy_pen = Sampler(SamplingConfig(temperature=0, repetition_penalty=10.0))
    assert greedy_pen(np.array([2.0, 1.9, -1.0]), history=[0]) == 1


@pytest.fixture(scope="module")
def rt(debug_run):
    return load_runtime(debug_run)


def test_torch_runtime_cache_matches_full_forward(rt):
    ids = rt.codec.encode_special("<s>Once upon a time, Tom went to the park.")
    rt.reset()
    full = rt.forward(ids, all_logits=True)
    rt.reset()
    rt.forward(ids[:5])
    steps = [rt.forward([t]) for t in ids[5:]]
    assert np.abs(np.stack(steps) - full[5:]).max() < 1e-4 and rt.n_past == len(ids)


def test_generation_streams_and_stops(rt):
    codec = rt.codec
    prompt = [codec.bos_id, *codec.encode("Once upon a time")]
    gen = Generation(rt, prompt, SamplingConfig(temperature=0, max_tokens=20), codec.stop_ids)
    text = "".join(stream_text(gen, codec))
    assert gen.stats.generated_tokens <= 20 and gen.stats.finish_reason in ("stop", "length")
    assert text == codec.decode([t for t in gen.tokens if t not in codec.stop_ids])
    again = generate_text(rt, codec, prompt, SamplingConfig(temperature=0, max_tokens=20))
    assert again == text  # greedy is deterministic, the cache is reset
    # a stop id the model emits first ends generation immediately
    first = gen.tokens[0]
    stopped = Generation(rt, prompt, SamplingConfig(temperature=0, max_tokens=20), [first])
    assert list(stopped) == [] and stopped.stats.finish_reason == "stop"


def test_multi_turn_reuses_the_cache(rt):
    codec = rt.codec
    hist: list[int] = []
    p1 = [codec.bos_id, *codec.encode("Tom had a ball.")]
    g1 = Generation(rt, p1, SamplingConfig(temperature=0, max_tokens=5), [], history=hist)
    out = list(g1)
    p2 = p1 + out + codec.encode(" Then")
    g2 = Generation(rt, p2, SamplingConfig(temperature=0, max_tokens=5), [], history=hist)
    list(g2)
    assert g2.stats.prompt_tokens == len(codec.encode(" Then"))  # only the new suffix was fed
