"""Masks on a transformer encoder: nn.MultiheadAttention reads its out_proj's weight directly, and PyTorch's fused
inference path reads the feed-forward weights directly; both must see the masks, and what is not masked must be
reported as dense."""

import pytest
import torch
from torch import nn

import regrow
from conftest import train_on
from regrow import masking
from regrow import posttraining as pts
from regrow.errors import ConfigError

IEE_SHORT = {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2}


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def trained(method, options, steps=12):
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = regrow.create(method, model, optimizer, sparsity=0.9, total_steps=20, **options)
    g = torch.Generator().manual_seed(1)
    train_on(model, optimizer, sp, ((torch.randn(16, 5, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
                                    for _ in range(steps)))
    return model, sp


def outputs(model, x, mode):
    model.train(mode == "train")
    with torch.set_grad_enabled(mode != "no_grad"):
        return model(x).detach()


METHODS = [("rigl", {"interval": 2}), ("gmp", {"interval": 2}), ("iee", IEE_SHORT)]


@pytest.mark.parametrize("method, options", METHODS, ids=[m for m, _ in METHODS])
def test_pruned_weights_never_reach_any_forward_path(method, options):
    model, sp = trained(method, options)
    assert "encoder.layers.0.self_attn.out_proj" in sp.layers  # used functionally by the attention
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(2))
    for mode in ("train", "eval", "no_grad"):  # no_grad in eval mode takes PyTorch's fused encoder path
        before = outputs(model, x, mode)
        saved = {n: masking.raw(m).detach().clone() for n, m in sp.layers.items()}
        with torch.no_grad():
            for m in sp.layers.values():
                pruned = ~masking.mask_of(m)
                masking.raw(m)[pruned] = 100 * torch.randn(int(pruned.sum()))
        assert torch.equal(outputs(model, x, mode), before), mode
        with torch.no_grad():
            for n, m in sp.layers.items():
                masking.raw(m).copy_(saved[n])
    model.eval()
    with torch.no_grad():
        before = model(x)
        sp.finalize()
        assert torch.equal(model(x), before)


def test_reported_sparsity_counts_every_weight_matrix():
    model, sp = trained("rigl", {"interval": 2})
    report = masking.weight_sparsity(model)
    total = zeros = 0
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            owner, _, attr = name.rpartition(".")
            effective = getattr(model.get_submodule(owner), attr)  # what the forward reads
            total += effective.numel()
            zeros += int((effective == 0).sum())
    assert report["sparsity"] == pytest.approx(zeros / total, abs=2e-3)
    assert report["sparsity"] < 0.8 < sp.actual_sparsity()  # the packed attention projections stay dense ...
    assert set(report["left_dense"]) == {f"encoder.layers.{i}.self_attn.in_proj_weight" for i in range(2)}
    assert "MultiheadAttention" in report["left_dense"]["encoder.layers.0.self_attn.in_proj_weight"]  # ... named


def test_wanda_and_pot_refuse_layers_that_never_run_as_modules():
    torch.manual_seed(0)
    model = TinyTransformer()
    images = torch.randn(32, 5, 8)
    layers = masking.prunable_layers(model)
    with pytest.raises(ConfigError, match="self_attn.out_proj.*never ran as a module"):
        pts.wanda_masks(model, layers, images, 0.5)
    layers = {n: m for n, m in layers.items() if not n.endswith("out_proj")}
    masks = pts.wanda_masks(model, layers, images, 0.5)
    inputs = pts.layer_inputs(model, layers, images)
    for name, m in layers.items():
        assert masks[name].float().mean() == pytest.approx(0.5, abs=0.02)
        pts.pot_refit(m, masks[name], inputs[name])  # 3-D (batch, tokens, features) inputs of a Linear
        assert (masking.raw(m)[~masks[name]] == 0).all()
