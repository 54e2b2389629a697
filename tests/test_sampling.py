"""The probability stream: exact Dirichlet(1) marginals and moments, positivity, determinism."""

import pytest
import torch
from scipy import stats

from mkopt.sampling import DirichletSampler, counter_dirichlet_, fill_dirichlet_, splitmix64, step_seed

N = 200_000


def sample(e: int, dtype=torch.float32, step: int = 0, seed: int = 0, n: int = N) -> torch.Tensor:
    sampler = DirichletSampler(e, seed)
    slot = sampler.allocate(torch.device("cpu"), dtype, torch.Size([n]))
    sampler.draw(step)
    return slot.current().clone()


@pytest.mark.parametrize("e", [1, 2, 3, 4, 8, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_columns_are_strictly_positive_and_sum_to_one(e, dtype):
    p = sample(e, dtype, n=300_000)
    assert p.dtype == dtype and p.shape == (e, 300_000)
    assert bool((p > 0).all())
    torch.testing.assert_close(p.sum(0), torch.ones(300_000, dtype=dtype), rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("e", [2, 3, 4, 8, 17])
def test_marginals_are_beta_1_e_minus_1(e):
    p = sample(e, torch.float64).numpy()
    for k in range(e):  # every coordinate of a Dirichlet(1,...,1) is Beta(1, e-1)
        assert stats.kstest(p[k], stats.beta(1, e - 1).cdf).pvalue > 1e-4


@pytest.mark.parametrize("e", [2, 3, 4, 8, 17])
def test_moments_match_dirichlet_one(e):
    p = sample(e, torch.float64)
    mean, var = 1 / e, (e - 1) / (e**2 * (e + 1))
    cov = -1 / (e**2 * (e + 1))
    se = (var / N) ** 0.5
    assert torch.allclose(p.mean(1), torch.full((e,), mean, dtype=torch.float64), atol=6 * se)
    assert torch.allclose(p.var(1), torch.full((e,), var, dtype=torch.float64), rtol=0.03)
    centered = p - p.mean(1, keepdim=True)
    assert abs(float((centered[0] * centered[1]).mean()) - cov) < 0.05 * abs(cov) + 6 * var / N**0.5
    # E[sum_k p_k^2] = 2 / (e + 1): the factor in the lr-compensation analysis (Lemma 4.3)
    assert abs(float((p**2).sum(0).mean()) - 2 / (e + 1)) < 0.01


def test_stream_is_a_function_of_seed_and_step_only():
    assert torch.equal(sample(3, step=5, seed=1), sample(3, step=5, seed=1))
    assert not torch.equal(sample(3, step=5, seed=1), sample(3, step=6, seed=1))
    assert not torch.equal(sample(3, step=5, seed=1), sample(3, step=5, seed=2))


@pytest.mark.parametrize("e", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 80, 70_001])
def test_compiled_and_eager_sampler_are_bit_identical(e, dtype, n):  # spacings: no logarithm, exact
    compiled = counter_dirichlet_(torch.empty(e, n, dtype=dtype), key=12345, compiled=True)
    eager = counter_dirichlet_(torch.empty(e, n, dtype=dtype), key=12345, compiled=False)
    assert torch.equal(compiled, eager)


def test_e_above_16_compiled_and_eager_agree_to_one_ulp():  # exponentials: log differs in the last bit
    compiled = counter_dirichlet_(torch.empty(17, 5000), key=1, compiled=True)
    eager = counter_dirichlet_(torch.empty(17, 5000), key=1, compiled=False)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2.5e-7)


def test_counter_generator_is_splitmix64():
    def reference(state: int, count: int) -> list[int]:  # Steele et al.'s SplitMix64, in Python ints
        out, mask = [], 2**64 - 1
        for _ in range(count):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            out.append(z ^ (z >> 31))
        return out

    for key in (0, 1, 2**62 + 12345):
        values = splitmix64(torch.arange(6), torch.tensor(key))
        assert [int(v) & (2**64 - 1) for v in values] == reference(key, 6)


def test_stream_does_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sample(3, n=700_000, step=3)
        torch.set_num_threads(max(2, threads))
        multi = sample(3, n=700_000, step=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_neighbouring_elements_and_steps_are_not_correlated():
    p = sample(2, torch.float64, n=100_000)
    assert abs(float(torch.corrcoef(torch.stack([p[0, :-1], p[0, 1:]]))[0, 1])) < 0.015
    q = sample(2, torch.float64, n=100_000, step=1)
    assert abs(float(torch.corrcoef(torch.stack([p[0], q[0]]))[0, 1])) < 0.015


def test_views_of_several_tensors_share_one_flat_buffer():
    sampler = DirichletSampler(3, 0)
    a = sampler.allocate(torch.device("cpu"), torch.float32, torch.Size([4, 5])).view
    b = sampler.allocate(torch.device("cpu"), torch.float32, torch.Size([7])).view
    sampler.draw(0)
    (flat,) = sampler.buffers.values()
    assert flat.shape == (3, 27)
    assert a.shape == (3, 4, 5) and b.shape == (3, 7)
    assert torch.equal(a.reshape(3, -1), flat[:, :20]) and torch.equal(b, flat[:, 20:])
    before = flat.data_ptr()
    sampler.draw(1)
    assert flat.data_ptr() == before and torch.equal(a.reshape(3, -1), flat[:, :20])  # refilled in place


@pytest.mark.parametrize("e", [2, 3, 5])
def test_generic_fill_with_a_torch_generator(e):
    p = fill_dirichlet_(torch.empty(e, 100_000, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert bool((p > 0).all())
    assert stats.kstest(p[0].numpy(), stats.beta(1, e - 1).cdf).pvalue > 1e-4


def test_step_seed_is_deterministic_and_spreads():
    assert step_seed(0, 0) == step_seed(0, 0)
    seeds = {step_seed(s, t, r) for s in range(4) for t in range(50) for r in range(3)}
    assert len(seeds) == 600 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("e", [2, 3, 4, 8])
def test_regenerated_slots_equal_the_buffer_columns(e):
    """A regenerating sampler keeps no buffer; each slot rebuilds exactly its columns of the stream."""
    shapes = [torch.Size([4, 5]), torch.Size([7]), torch.Size([3, 2, 2])]
    buffered, regenerated = DirichletSampler(e, 9), DirichletSampler(e, 9, regenerate=True)
    slots = {s: [s.allocate(torch.device("cpu"), torch.float32, shape) for shape in shapes] for s in (buffered, regenerated)}
    for step in (0, 3):
        buffered.draw(step)
        regenerated.draw(step)
        assert regenerated.buffers == {}
        for a, b in zip(slots[buffered], slots[regenerated]):
            torch.testing.assert_close(b.current(), a.current(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="keeps no buffer"):
        regenerated.views
    with pytest.raises(RuntimeError, match="buffer mode"):
        regenerated.fill_uniform(0)


# Columns 0, 1 and 999 of stream key 12345, as mkopt's version-2 generator (commit d2430c0) drew them.
VERSION_2_COLUMNS = {
    (2, torch.float32): [[0.1330796480178833, 0.8669203519821167], [0.20481657981872559, 0.7951834201812744], [0.6042460203170776, 0.39575397968292236]],
    (2, torch.float64): [[0.1330796686614273, 0.8669203313385727], [0.20481663336165912, 0.7951833666383409], [0.6042460566410242, 0.39575394335897585]],
    (3, torch.float32): [[0.1330796480178833, 0.5302667021751404, 0.3366536498069763], [0.20481657981872559, 0.7603318691253662, 0.0348515510559082], [0.010162532329559326, 0.5940834879875183, 0.39575397968292236]],
    (3, torch.float64): [[0.1330796686614273, 0.07173696470023183, 0.7951833666383409], [0.11954258300911547, 0.05657522423584571, 0.8238821927550388], [0.478846598428861, 0.3709733896362434, 0.1501800119348956]],
}  # fmt: skip


@pytest.mark.parametrize("e,dtype", list(VERSION_2_COLUMNS))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_e2_and_e3_streams_are_those_of_version_2(e, dtype, compiled):
    """Checkpoints of earlier runs resume bit-identically for e <= 3 (only e >= 4 changed in version 3)."""
    p = counter_dirichlet_(torch.empty(e, 1000, dtype=dtype), key=12345, compiled=compiled)
    assert p[:, [0, 1, 999]].T.tolist() == VERSION_2_COLUMNS[(e, dtype)]
