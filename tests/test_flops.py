"""MACs per layer and training FLOPs, against counts done by hand."""

import pytest
from torch import nn

from regrow.flops import forward_flops, layer_macs


def test_layer_macs_match_hand_counts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.Conv2d(8, 16, 1, stride=2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))
    macs = layer_macs(model, (3, 10, 10))
    assert macs == {"0": 8 * 100 * 3 * 9,        # out channels × positions × (in × kernel)
                    "1": 8 * 100 * 2 * 9,        # grouped: in / groups per output
                    "2": 16 * 25 * 8,            # stride 2 halves both sides
                    "4": 10 * 400}
    assert model.training  # restored


def test_forward_flops_scale_each_layer_by_its_density():
    macs = {"a": 100, "b": 50}
    assert forward_flops(macs) == 300
    assert forward_flops(macs, {"a": 0.1}) == pytest.approx(2 * (10 + 50))
