"""The samplers draw from the distribution hal/ops.py's ``sample`` contract defines: temperature,
then top-k, then top-p on the renormalised survivors. For every registered implementation
(cpu reference and torch, cuda's, the NPU's through the emulator) and the reference function
itself: N seeded draws of one logits row, against the exact probabilities computed here in
float64 numpy, with a Pearson chi-square test (p > 1e-4). Tokens the filters remove must never
be drawn. Each case also checks that it has the power to see a sampler that ignores the
temperature (the expected statistic of that bug is far past the bound)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hal.registry import implementations

LOGITS = np.array([3.0, 2.2, 1.9, 1.0, 0.6, 0.3, 0.0, -0.4, -0.9, -1.5, -2.0, -3.0])
DRAW_SIZES = (1000, 2000, 4000, 8000)
P_MIN = 1e-4
SETTINGS = [(t, k, p) for t in (0.5, 0.7, 1.3) for k in (0, 5) for p in (1.0, 0.8)]


def exact(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The contract's distribution over LOGITS, float64."""
    z = LOGITS / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[:top_k] if top_k > 0 else order] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        before = np.cumsum(probs[order]) - probs[order]  # mass strictly above each token
        assert np.abs(before[before > 0] - top_p).min() > 1e-3, "a top-p boundary too close to call"
        dropped = order[before >= top_p]
        probs[dropped] = 0.0
        probs /= probs.sum()
    return probs


def chi_square_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat) = Q(dof/2, stat/2), the regularised upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _bins(expected: np.ndarray) -> list[np.ndarray]:
    """Token groups with an expected count of at least 5 (the smallest merged together)."""
    order = [int(i) for i in np.argsort(-expected) if expected[i] > 0]
    groups, current = [], []
    for i in order:
        current.append(i)
        if expected[current].sum() >= 5:
            groups.append(np.array(current))
            current = []
    if current:
        groups[-1] = np.concatenate([groups[-1], current])
    return groups


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int, list[np.ndarray]]:
    expected = probs * counts.sum()
    groups = _bins(expected)
    stat = sum((counts[g].sum() - expected[g].sum()) ** 2 / expected[g].sum() for g in groups)
    return float(stat), len(groups) - 1, groups


def _samplers():
    """(label, needs the NPU emulator) for every registered impl (cpu.reference: the judge)."""
    found = []
    for backend in ("cpu", "cuda", "npu"):
        found += [(impl.qualname, backend == "npu") for impl in implementations("sample", backend)]
    return found


SAMPLERS = _samplers()


@pytest.fixture
def sampler(request, monkeypatch):
    label, npu = request.param
    if npu:
        from backends.npu import emulator
        from hal.probing import reset

        monkeypatch.setenv("HAL_NPU_EMULATE", "1")
        reset()
        request.addfinalizer(lambda: (emulator.uninstall(), reset()))
    backend, _, name = label.partition(".")
    impl = next(i for i in implementations("sample", backend) if i.name == name)
    return impl.load()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s[0] for s in SAMPLERS], indirect=True)
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_draws_follow_the_exact_distribution(sampler, temperature, top_k, top_p):
    probs = exact(temperature, top_k, top_p)
    draws = sample_size(probs, exact(1.0, top_k, top_p))
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(draws, -1).contiguous()
    seed = int(temperature * 100) * 100 + top_k * 10 + int(top_p * 10)
    ids = sampler(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    assert ids.shape == (draws,) and ids.dtype == torch.int64
    counts = np.bincount(ids.cpu().numpy(), minlength=len(LOGITS)).astype(np.float64)
    assert counts[probs == 0].sum() == 0, f"drew filtered tokens: {np.nonzero(counts * (probs == 0))[0]}"
    stat, dof, groups = chi_square(counts, probs)
    p_value = chi_square_sf(stat, dof)
    assert p_value > P_MIN, f"chi2 {stat:.1f} on {dof} dof: p = {p_value:.1e}; counts {counts.tolist()}"
    assert power(probs, exact(1.0, top_k, top_p), draws, groups) < 1e-8


def power(probs: np.ndarray, wrong: np.ndarray, draws: int, groups: list[np.ndarray] | None = None) -> float:
    """The p-value a sampler that ignores the temperature (draws from ``wrong``, the T = 1
    filtered distribution) would get on average: its statistic is about dof + draws *
    sum((p1 - p0)^2 / p0) over the bins."""
    groups = groups if groups is not None else chi_square(probs * draws, probs)[2]
    shift = sum((wrong[g].sum() - probs[g].sum()) ** 2 / probs[g].sum() for g in groups)
    return chi_square_sf(len(groups) - 1 + draws * shift, len(groups) - 1)


def sample_size(probs: np.ndarray, wrong: np.ndarray) -> int:
    """The fewest draws of :data:`DRAW_SIZES` that would expose the ignored temperature."""
    return next((n for n in DRAW_SIZES if power(probs, wrong, n) < 1e-8), DRAW_SIZES[-1])


def test_the_reference_sampler_is_among_them():
    assert ("cpu.reference", False) in SAMPLERS and ("npu.torch_npu", True) in SAMPLERS
    ref = next(i for i in implementations("sample", "cpu") if i.name == "reference")
    assert ref.fn == "backends.cpu.reference.sample:sample_ref"


def test_exact_distribution_hand_checked():
    """exact() itself: T = 0.5 top token 0.742 (e^6 / sum e^(2 l)); top-k 2 renormalises the two."""
    z = np.exp(2 * LOGITS)
    assert exact(0.5, 0, 1.0)[0] == pytest.approx(z[0] / z.sum(), rel=1e-12)
    assert exact(0.5, 2, 1.0)[:2] == pytest.approx([z[0] / z[:2].sum(), z[1] / z[:2].sum()], rel=1e-12)
    # top-p 0.8 at T = 0.5: 0.742 < 0.8, so the second token is kept too, and nothing else
    kept = exact(0.5, 0, 0.8)
    assert np.count_nonzero(kept) == 2 and kept[:2] == pytest.approx(z[:2] / z[:2].sum())
    assert chi_square_sf(18.307, 10) == pytest.approx(0.05, abs=1e-4)  # the textbook 95% point
