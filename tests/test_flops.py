"""MACs per layer and training FLOPs, against counts done by hand."""

import pytest
import torch
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


class Attention(nn.Module):
    """An nn.MultiheadAttention, which never calls its projections as modules, and a Linear nothing calls."""

    def __init__(self, kdim=None, vdim=None, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.unused = nn.Linear(4, 4)
        self.batch_first = batch_first

    def forward(self, x):  # x: (batch, 6 query tokens + 4 key/value tokens, 16)
        q, kv = x[:, :6], x[:, 6:]
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        return self.attn(q, key=kv[..., : self.attn.kdim], value=kv[..., : self.attn.vdim])[0]


def test_multihead_attention_projections_are_counted_and_a_layer_that_never_ran_is_named():
    with pytest.warns(UserWarning, match="never ran as modules.*unused"):
        macs = layer_macs(Attention(), (10, 16))
    # queries and keys/values of different lengths: the packed q/k/v weight is counted part by part
    assert macs == {"attn.q_proj_weight": 6 * 16 * 16, "attn.k_proj_weight": 4 * 16 * 16,
                    "attn.v_proj_weight": 4 * 16 * 16,
                    "attn.out_proj": 6 * 16 * 16,  # the masked Linear's own name: its density scales it
                    "unused": 0}
    with pytest.warns(UserWarning):
        macs = layer_macs(Attention(kdim=8, vdim=12, batch_first=False), (10, 16))
    assert macs == {"attn.q_proj_weight": 6 * 16 * 16, "attn.k_proj_weight": 4 * 8 * 16,
                    "attn.v_proj_weight": 4 * 12 * 16, "attn.out_proj": 6 * 16 * 16, "unused": 0}
    assert torch.backends.mha.get_fastpath_enabled()  # restored
