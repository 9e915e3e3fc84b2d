import pytest
import torch

from regrow.errors import ConfigError
from regrow.structures import NM, Unstructured, get_structure


def test_select_prune_grow_counts():
    s = Unstructured()
    scores = torch.arange(12.0).reshape(3, 4)
    mask = s.select(scores, 5)
    assert mask.sum() == 5 and mask.flatten()[-5:].all()
    pruned = s.prune(mask, scores, 2)  # drops the two lowest active: 7 and 8
    assert pruned.sum() == 3 and not pruned.flatten()[7] and not pruned.flatten()[8]
    grow_scores = torch.zeros(3, 4)
    grow_scores.view(-1)[[0, 8, 11]] = torch.tensor([5.0, 9.0, 100.0])  # 11 is active: not eligible
    grown = s.grow(pruned, grow_scores, 2)
    assert grown.sum() == 5 and grown.flatten()[0] and grown.flatten()[8]
    with pytest.raises(ConfigError):
        s.prune(mask, scores, 6)
    with pytest.raises(ConfigError):
        s.grow(mask, scores, 8)


def test_nm_keeps_n_per_group_along_input_channels():
    s = NM(2, 4)
    scores = torch.randn(6, 8, 3, 3)
    mask = s.select(scores)
    groups = mask.movedim(1, -1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    # the kept ones are the two largest of each group
    g_scores = scores.movedim(1, -1).reshape(-1, 4)
    top = g_scores.topk(2, dim=1).values.min(1).values
    assert (g_scores[groups] >= top.repeat_interleave(2)).all()


def test_nm_prune_then_grow_restores_n_per_group():
    s = NM(2, 4)
    g = torch.Generator().manual_seed(0)
    mask = s.select(torch.rand(8, 16, generator=g))
    pruned = s.prune(mask, torch.rand(8, 16, generator=g), 10)
    assert pruned.sum() == mask.sum() - 10
    grown = s.grow(pruned, torch.rand(8, 16, generator=g), 10)
    assert (grown.reshape(-1, 4).sum(1) == 2).all()
    with pytest.raises(ConfigError, match="deficit"):
        s.grow(pruned, torch.rand(8, 16, generator=g), 3)


def test_structure_names_and_errors():
    assert isinstance(get_structure("unstructured"), Unstructured)
    assert get_structure("2:4").density == 0.5
    for bad in ("3:2", "a:b", "blocks"):
        with pytest.raises(ConfigError):
            get_structure(bad)
    assert not NM(2, 4).supports(torch.Size([16, 3, 3, 3]))
    with pytest.raises(ConfigError, match="multiple of 4"):
        NM(2, 4).select(torch.randn(16, 3, 3, 3))
