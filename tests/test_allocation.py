import pytest
import torch

from regrow.allocation import erk_densities, keep_counts
from regrow.errors import ConfigError
from regrow.models import create_model

# conv 4×1×3×3 (36), conv 8×4×3×3 (288), linear 10×8 (80); N = 404.
SHAPES = {"a": torch.Size([4, 1, 3, 3]), "b": torch.Size([8, 4, 3, 3]), "c": torch.Size([10, 8])}


def test_erk_matches_hand_computed_example_with_layers_pushed_dense():
    # ERK raw scores: a (4+1+3+3)/36, b (8+4+3+3)/288, c (10+8)/80. At S = 0.5 the budget is 202:
    # eps = 202/47 makes a's density 1.31 > 1 -> a dense; then eps = 166/36 makes c's 1.04 > 1 -> c dense;
    # then b alone: eps = 86/18, density 86/288.
    dens = erk_densities(SHAPES, 0.5)
    assert dens["a"] == 1.0 and dens["c"] == 1.0
    assert dens["b"] == pytest.approx(86 / 288)
    assert keep_counts(SHAPES, 0.5, "erk") == {"a": 36, "b": 86, "c": 80}


def test_er_ignores_kernel_sizes():
    dens = erk_densities({"b": SHAPES["b"], "c": SHAPES["c"]}, 0.8, with_kernel=False)
    # ER scores: b (8+4)/(8·4) = 0.375 per weight, c (10+8)/80 = 0.225; eps·(0.375·288 + 0.225·80) = 73.6
    eps = 0.2 * 368 / (0.375 * 288 + 0.225 * 80)
    assert dens["b"] == pytest.approx(eps * 0.375) and dens["c"] == pytest.approx(eps * 0.225)


@pytest.mark.parametrize("distribution", ["erk", "er", "global"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_global_target_met_within_one_weight(distribution, sparsity):
    model = create_model("resnet20")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    shapes = {n: m.weight.shape for n, m in layers.items()}
    scores = {n: m.weight.abs() for n, m in layers.items()}
    counts = keep_counts(shapes, sparsity, distribution, scores=scores)
    total = sum(s.numel() for s in shapes.values())
    assert abs(sum(counts.values()) - (1 - sparsity) * total) <= 1
    assert all(0 <= counts[n] <= shapes[n].numel() for n in shapes)


def test_uniform_with_dense_first_and_last():
    counts = keep_counts(SHAPES, 0.75, "uniform", dense_first=True, dense_last=True)
    assert counts == {"a": 36, "b": 72, "c": 80}
    assert keep_counts(SHAPES, 0.75, "uniform") == {"a": 9, "b": 72, "c": 20}


def test_global_ranks_all_layers_together():
    scores = {"a": torch.full(SHAPES["a"], 5.0), "b": torch.zeros(SHAPES["b"]), "c": torch.ones(SHAPES["c"])}
    assert keep_counts(SHAPES, 1 - 100 / 404, "global", scores=scores) == {"a": 36, "b": 0, "c": 64}


def test_bad_allocation_input():
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        keep_counts(SHAPES, 1.3)
    with pytest.raises(ConfigError, match="unknown distribution 'erx'"):
        keep_counts(SHAPES, 0.5, "erx")
    with pytest.raises(ConfigError, match="needs scores"):
        keep_counts(SHAPES, 0.5, "global")
