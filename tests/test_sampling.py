"""Samplers: each filter against a hand-worked example, the chain's order, penalties, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from hybridllm.sampling import (
    Sampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)


def _cands(logits: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(len(logits)), np.asarray(logits, dtype=np.float32)


def test_greedy_is_argmax_first_max() -> None:
    sample = make_sampler(temperature=0)
    assert (
        sample(np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)) == 1
    )  # llama.cpp keeps the first max


def test_top_k_keeps_the_k_best_sorted() -> None:
    ids, logits = apply_top_k(_cands([0.1, 5.0, -1.0, 3.0, 4.0]), 3)
    assert ids.tolist() == [1, 4, 3]
    assert logits.tolist() == pytest.approx([5.0, 4.0, 3.0])
    assert apply_top_k(_cands([1.0, 2.0]), 0)[0].tolist() == [1, 0]  # k <= 0 keeps all, sorted


def test_top_p_smallest_prefix_reaching_p() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.125 (logits log2 apart)
    c = apply_top_k(_cands([np.log(4), np.log(2), 0.0, 0.0]), 0)
    assert apply_top_p(c, 0.5)[0].tolist() == [0]
    assert apply_top_p(c, 0.6)[0].tolist() == [0, 1]
    assert apply_top_p(c, 0.75)[0].tolist() == [0, 1]
    assert len(apply_top_p(c, 1.0)[0]) == 4


def test_min_p_relative_to_the_top_token() -> None:
    c = apply_top_k(_cands([np.log(1.0), np.log(0.5), np.log(0.04), np.log(0.01)]), 0)
    assert apply_min_p(c, 0.05)[0].tolist() == [0, 1]  # 0.04 < 0.05 * 1.0
    assert apply_min_p(c, 0.03)[0].tolist() == [0, 1, 2]
    assert len(apply_min_p(c, 0.0)[0]) == 4


def test_seed_makes_sampling_reproducible() -> None:
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    draws = [[make_sampler(1.0, 0, 1.0, 0.0, seed=s)(logits) for _ in range(1)] for s in (7, 7)]
    a = make_sampler(1.0, 0, 1.0, 0.0, seed=7)
    b = make_sampler(1.0, 0, 1.0, 0.0, seed=7)
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
    assert draws[0] == draws[1]


def test_temperature_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    sample = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    counts = np.bincount([sample(logits) for _ in range(4000)], minlength=3) / 4000
    assert counts == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = np.random.default_rng(3).standard_normal(500).astype(np.float32)
    sample = make_sampler(temperature=5.0, top_k=1, seed=0)
    assert all(sample(logits) == int(np.argmax(logits)) for _ in range(20))


def test_min_p_applies_before_temperature() -> None:
    # at a huge temperature everything is nearly uniform, but min_p already cut the tail
    logits = np.array([10.0, 9.9, 0.0, 0.0], dtype=np.float32)
    sample = make_sampler(temperature=100.0, top_k=0, top_p=1.0, min_p=0.5, seed=2)
    assert {sample(logits) for _ in range(200)} == {0, 1}


def test_repeat_penalty_like_llama_cpp() -> None:
    (penalize,) = make_logits_processors(repeat_penalty=2.0, repeat_last_n=3)
    logits = np.array([4.0, -4.0, 4.0, 1.0], dtype=np.float32)
    out = penalize(logits, [0, 0, 3, 1])  # only the last 3 (0, 3, 1) count
    assert out.tolist() == [2.0, -8.0, 4.0, 0.5]  # positive / 2, negative * 2
    assert logits.tolist() == [4.0, -4.0, 4.0, 1.0]  # not modified in place


def test_presence_and_frequency_penalties() -> None:
    (penalize,) = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(np.zeros(3, dtype=np.float32), [1, 1, 2])
    assert out.tolist() == pytest.approx([0.0, -1.0, -0.75])


def test_no_penalties_means_no_processors() -> None:
    assert make_logits_processors() == []


def test_sampler_applies_penalties_before_greedy() -> None:
    s = Sampler.create(temperature=0, repeat_penalty=10.0)
    logits = np.array([5.0, 4.0], dtype=np.float32)
    assert s(logits, []) == 0
    assert s(logits, [0]) == 1  # 5/10 < 4


def test_invalid_repeat_penalty() -> None:
    with pytest.raises(ValueError, match="repeat_penalty"):
        make_logits_processors(repeat_penalty=0.0)
