import math

import pytest
import torch

from regrow.criteria import ScoreAccumulator, get_criterion, magnitude, taylor
from regrow.errors import ConfigError
from regrow.schedules import cosine_fraction, cosine_lr, exponential_fraction, gmp_sparsity


def test_gmp_cubic_values():
    assert gmp_sparsity(0, 0.0, 0.9, 0, 100) == 0.0
    assert gmp_sparsity(100, 0.0, 0.9, 0, 100) == pytest.approx(0.9)
    assert gmp_sparsity(50, 0.0, 0.9, 0, 100) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert gmp_sparsity(500, 0.0, 0.9, 0, 100) == pytest.approx(0.9)  # fixed after the end
    assert gmp_sparsity(30, 0.2, 0.8, 10, 50) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 0.5) ** 3)


def test_update_fractions():
    assert cosine_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_fraction(100, 0.3, 100) == 0.0
    assert exponential_fraction(50, 0.3, 100, decay=0.01) == pytest.approx(0.03)
    assert exponential_fraction(120, 0.3, 100) == 0.0


def test_cosine_lr_with_warmup():
    assert cosine_lr(0, 100, 0.1, warmup=10) == pytest.approx(0.01)
    assert cosine_lr(9, 100, 0.1, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 0.1, warmup=10) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0)


def test_criteria_formulas():
    w = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, 0.5, -1.0])
    assert torch.equal(magnitude(w), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(taylor(w, g), torch.tensor([0.5, 1.0, 3.0]))
    assert torch.equal(get_criterion("gradient")(w, g), torch.tensor([0.5, 0.5, 1.0]))
    with pytest.raises(ConfigError, match="unknown criterion"):
        get_criterion("hessian")


def test_taylor_accumulates_signed_terms_over_steps():
    w = torch.tensor([1.0, 2.0])
    acc = ScoreAccumulator("taylor")
    acc.add(w, torch.tensor([1.0, 1.0]))
    acc.add(w, torch.tensor([-1.0, 2.0]))
    assert torch.allclose(acc.score(), torch.tensor([0.0, 3.0]))  # |(1-1)/2|, |(2+4)/2|
    acc = ScoreAccumulator("taylor", mode="sum_of_abs")
    acc.add(w, torch.tensor([1.0, 1.0]))
    acc.add(w, torch.tensor([-1.0, 2.0]))
    assert torch.allclose(acc.score(), torch.tensor([1.0, 3.0]))
