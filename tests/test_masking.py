import pytest
import torch
from torch import nn

import regrow
from conftest import TinyNet, batch, train_on, train_steps
from regrow import masking
from regrow.errors import CheckpointError

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pruned_weights_stay_zero_and_keep_no_optimizer_state(tiny, name):
    optimizer = OPTIMIZERS[name](tiny.parameters())
    sp = regrow.Static(tiny, optimizer, sparsity=0.8, distribution="uniform", seed=1)
    before = {n: masking.raw(m).detach().clone() for n, m in sp.layers.items()}
    masks = sp.masks()
    train_steps(tiny, optimizer, sp, 100)
    for n, m in sp.layers.items():
        pruned = ~masks[n]
        assert torch.equal(masking.mask_of(m), masks[n])
        # The forward sees exactly zero, and the remembered dense value did not drift (weight decay, momentum).
        assert (masking.raw(m) * m.weight_mask)[pruned].abs().max() == 0
        assert torch.equal(masking.raw(m)[pruned], before[n][pruned])
        # Active weights did train.
        assert not torch.equal(masking.raw(m)[masks[n]], before[n][masks[n]])
        for key, state in optimizer.state[masking.raw(m)].items():
            if torch.is_tensor(state) and state.shape == masking.raw(m).shape:
                assert state[pruned].abs().max() == 0, key


def test_forward_sees_weight_times_mask(tiny):
    layer = masking.add_mask(tiny.grouped)
    mask = torch.rand(masking.raw(layer).shape) > 0.5
    masking.set_mask(layer, mask)
    x = torch.randn(2, 8, 6, 6)
    expected = nn.functional.conv2d(x, masking.raw(layer) * mask, None, 1, 1, 1, 2)
    assert torch.allclose(layer(x), expected)
    assert "grouped.weight_mask" in tiny.state_dict()


def test_only_linear_and_conv_are_prunable(tiny):
    names = set(masking.prunable_layers(tiny))
    assert names == {"conv1", "grouped", "depthwise", "fc"}
    with pytest.raises(regrow.ConfigError, match="cannot mask LayerNorm"):
        masking.add_mask(nn.LayerNorm(4))
    with pytest.raises(regrow.ConfigError, match="no prunable"):
        masking.prunable_layers(tiny, include=["bn1"])
    emb = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert list(masking.prunable_layers(emb)) == ["2"]


def test_frozen_entries_do_not_change_bit_for_bit(tiny):
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sp = regrow.Static(tiny, optimizer, sparsity=0.5, distribution="uniform")
    train_steps(tiny, optimizer, sp, 5)
    layer = sp.layers["fc"]
    active = masking.mask_of(layer)
    momentum_before = optimizer.state[masking.raw(layer)]["momentum_buffer"].clone()
    # Explore: forward sees every weight, but only the pruned ones may change.
    masking.set_mask(layer, torch.ones_like(active))
    masking.set_trainable(layer, ~active)
    weight_before = masking.raw(layer).detach().clone()
    train_steps(tiny, optimizer, None, 10, seed=100)
    assert torch.equal(masking.raw(layer)[active], weight_before[active])
    assert torch.equal(optimizer.state[masking.raw(layer)]["momentum_buffer"][active], momentum_before[active])
    assert not torch.equal(masking.raw(layer)[~active], weight_before[~active])


def test_masks_round_trip_through_state_dict_into_original_class(tiny):
    sp = regrow.Static(tiny, None, sparsity=0.7, distribution="erk")
    state = tiny.state_dict()
    fresh = TinyNet()
    masking.load_state_dict(fresh, state)
    x, _ = batch()
    tiny.eval()
    fresh.eval()
    assert torch.equal(tiny(x), fresh(x))
    assert masking.masked_layers(fresh).keys() == sp.layers.keys()
    # finalize gives a plain model whose state dict loads into the original class with strict loading.
    sp.finalize()
    plain = TinyNet()
    plain.load_state_dict(tiny.state_dict())
    plain.eval()
    tiny.eval()
    assert torch.equal(plain(x), fresh(x))
    assert not masking.masked_layers(tiny)
    assert type(tiny.fc) is nn.Linear


def test_loading_another_architecture_is_a_clear_error(tiny):
    regrow.Static(tiny, None, sparsity=0.5)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="another architecture"):
        masking.load_state_dict(other, tiny.state_dict())


def test_dense_gradient_is_recorded_for_pruned_weights(tiny):
    sp = regrow.Static(tiny, None, sparsity=0.9, distribution="uniform")
    layer = sp.layers["fc"]
    masking.capture_dense_grad(layer)
    x, y = batch()
    nn.functional.cross_entropy(tiny(x), y).backward()
    dense = masking.dense_grad(layer)
    pruned = ~masking.mask_of(layer)
    assert dense is not None and dense[pruned].abs().sum() > 0
    assert masking.raw(layer).grad[pruned].abs().sum() == 0  # the parameter's own gradient is masked
    assert torch.allclose(masking.raw(layer).grad, dense * layer.weight_mask)


def test_dense_gradient_sums_within_a_step_and_restarts_after_clearing(tiny):
    sp = regrow.Static(tiny, None, sparsity=0.5, distribution="uniform")
    layer = sp.layers["fc"]
    masking.capture_dense_grad(layer)

    def grad_of(seed):
        tiny.zero_grad()
        x, y = batch(seed)
        nn.functional.cross_entropy(tiny(x), y).backward()
        return masking.raw(layer).grad.clone()

    g1 = grad_of(1)
    first = masking.dense_grad(layer).clone()
    g2 = grad_of(2)
    assert torch.allclose(masking.dense_grad(layer) * layer.weight_mask, g1 + g2)  # two backwards: summed
    masking.clear_dense_grad(layer)
    grad_of(3)
    assert not torch.allclose(masking.dense_grad(layer), first + masking.dense_grad(layer))
    g3 = grad_of(4)
    masking.clear_dense_grad(layer)
    grad_of(4)
    assert torch.allclose(masking.dense_grad(layer) * layer.weight_mask, g3)


def test_bias_and_batchnorm_masks_zero_a_channel_and_hold_its_statistics(tiny):
    """Channel masks: conv rows + bias + BN gamma/beta; the channel's output is exactly 0 in train and eval mode,
    and its running statistics keep the values they had when it was masked."""
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    conv, bn = masking.add_mask(tiny.conv1, bias=True), masking.add_mask(tiny.bn1)
    assert masking.masked_params(conv) == ["weight", "bias"] and masking.masked_params(bn) == ["weight", "bias"]
    guard = masking.OptimizerGuard(optimizer, [conv, bn])
    train_steps(tiny, optimizer, None, 3)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 5]] = False
    masking.set_mask(conv, keep[:, None, None, None].expand_as(masking.raw(conv)).clone())
    masking.set_mask(conv, keep, "bias")
    for param in ("weight", "bias"):
        masking.set_mask(bn, keep, param)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    params = {"w": masking.raw(conv), "b": masking.raw(conv, "bias"), "g": masking.raw(bn),
              "be": masking.raw(bn, "bias")}
    values = {n: p.detach().clone() for n, p in params.items()}
    train_steps(tiny, optimizer, None, 5, seed=50)
    assert torch.equal(bn.running_mean[~keep], stats[0][~keep]) and torch.equal(bn.running_var[~keep], stats[1][~keep])
    assert not torch.equal(bn.running_mean[keep], stats[0][keep])
    for name, p in params.items():
        assert torch.equal(p[~keep], values[name][~keep]), name  # masked entries kept through wd + momentum
    x, _ = batch(9)
    for mode in (True, False):
        tiny.train(mode)
        out = tiny.bn1(tiny.conv1(x))
        assert out[:, ~keep].abs().max() == 0 and out[:, keep].abs().max() > 0
    state = tiny.state_dict()
    assert "conv1.bias_mask" in state and "bn1.weight_mask" in state and "bn1.bias_mask" in state
    fresh = TinyNet()
    masking.load_state_dict(fresh, state)
    assert torch.equal(masking.mask_of(fresh.bn1, "bias"), keep)
    guard.remove()
    masking.remove_mask(conv)
    masking.remove_mask(bn)
    assert (tiny.conv1.bias[~keep] == 0).all() and (tiny.bn1.weight[~keep] == 0).all()  # baked: plain modules
    assert type(tiny.bn1) is nn.BatchNorm2d and "bn1.bias_mask" not in tiny.state_dict()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_scale_is_a_per_entry_learning_rate(name):
    """Scaling the step of some entries by f trains them exactly as the optimizer at f × lr would (the others as
    at lr), for SGD with momentum, Nesterov and weight decay, Adam and AdamW. The loss is a sum of one term per
    weight, so every entry's path depends on its own learning rate only."""
    g = torch.Generator().manual_seed(1)
    target, where = torch.randn(10, 20, generator=g), torch.rand(10, 20, generator=g) < 0.5

    def run(scale_where, lr_factor):
        torch.manual_seed(0)
        layer = masking.add_mask(nn.Linear(20, 10))
        optimizer = OPTIMIZERS[name]([masking.raw(layer)])
        for group in optimizer.param_groups:
            group["lr"] *= lr_factor
        guard = masking.OptimizerGuard(optimizer, [layer])
        if scale_where is not None:
            masking.set_step_scale(layer, scale_where, 0.1)
        for _ in range(6):
            loss = ((masking.raw(layer) - target) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        guard.remove()
        return masking.raw(layer).detach()

    scaled, full, slow = run(where, 1.0), run(None, 1.0), run(None, 0.1)
    torch.testing.assert_close(scaled[where], slow[where], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[~where], full[~where], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(slow[where], full[where])


def rigl_run(forward_of, steps=12):
    """RigL every 2 steps (gradient capture switching on and off) on TinyNet; returns losses and final masks."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = regrow.RigL(model, optimizer, sparsity=0.8, interval=2, total_steps=steps)
    forward = forward_of(model)
    losses = []
    for t in range(steps):
        x, y = batch(t)
        loss = nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sp.step()
        losses.append(loss.item())
    return losses, sp.masks(), len(sp.history)


def test_compiled_masked_forward_compiles_once_per_capture_state_and_equals_eager():
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counted, counted_masks, updates = rigl_run(lambda m: torch.compile(m, backend=counting_backend))
    # One graph without the dense-gradient probe and one with it, whatever the number of masked layers and
    # updates (a tensor hook in the forward broke the graph and recompiled per layer, past dynamo's limit of 8).
    assert updates >= 4 and len(graphs) == 2
    torch._dynamo.reset()
    compiled, compiled_masks, _ = rigl_run(lambda m: torch.compile(m, backend="aot_eager"))
    eager, eager_masks, _ = rigl_run(lambda m: m)
    assert compiled == pytest.approx(eager, rel=1e-5) and counted == pytest.approx(eager, rel=1e-5)
    for name in eager_masks:
        assert torch.equal(compiled_masks[name], eager_masks[name]), name
        assert torch.equal(counted_masks[name], eager_masks[name]), name


class TiedOutput(nn.Module):
    """A language-model-like net: the output projection's weight is the token embedding's (tied)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.inp, self.mid = nn.Linear(12, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 10, bias=False)
        self.out.weight = self.emb.weight
        self.again = self.mid  # one module under two names: not a tie

    def forward(self, x):
        h = torch.relu(self.inp(x)) + self.emb(torch.zeros(x.shape[0], dtype=torch.long))
        return self.out(torch.relu(self.mid(h)))


def test_a_tied_weight_is_left_dense_listed_so_that_baking_the_masks_keeps_the_function():
    torch.manual_seed(0)
    model = TiedOutput()
    assert masking.tied_weights(model) == {"out": ["emb.weight"]}
    assert list(masking.prunable_layers(model)) == ["inp", "mid"]
    with pytest.raises(regrow.ConfigError, match="out: shared with emb.weight"):
        masking.prunable_layers(model, include=["out"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = regrow.create("rigl", model, optimizer, sparsity=0.5, distribution="uniform", total_steps=20, interval=2)
    g = torch.Generator().manual_seed(0)
    # RigL prunes and regrows: a masked tied weight would keep stale values the embedding reads
    train_on(model, optimizer, sp, ((torch.randn(8, 12, generator=g), torch.randint(0, 10, (8,), generator=g))
                                    for _ in range(20)))
    report = masking.weight_sparsity(model, sp.skipped)
    assert list(report["left_dense"]) == ["emb.weight"] and "tied" in report["left_dense"]["emb.weight"]
    x = torch.randn(4, 12, generator=g)
    model.eval()
    with torch.no_grad():
        before = model(x)
        sp.finalize()
        assert torch.equal(model(x), before)


def test_channel_groups_through_a_tied_weight_are_left_whole_with_the_reason():
    from regrow.channels.groups import channel_groups

    groups = {g.root: g.excluded for g in channel_groups(TiedOutput(), torch.zeros(1, 12))}
    assert "out, whose weight is shared with emb.weight" in groups["mid"]


def test_a_computed_weight_is_left_dense_with_the_reason_and_refused_by_name():
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    from regrow.channels.groups import channel_groups

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 16)), nn.ReLU(),
                          nn.Linear(16, 3))
    assert list(masking.prunable_layers(model)) == ["4"]
    with pytest.raises(regrow.ConfigError, match="0: its weight is computed"):
        masking.prunable_layers(model, include=["0"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = regrow.create("rigl", model, optimizer, sparsity=0.5, total_steps=10)
    left = masking.weight_sparsity(model, sp.skipped)["left_dense"]
    assert set(left) == {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
                         "2.parametrizations.weight.original"}
    assert all("computed from other parameters" in reason for reason in left.values())
    groups = {g.root: g.excluded for g in channel_groups(model, torch.zeros(1, 8))}
    assert "its weight is computed" in groups["0"] and "its weight is computed" in groups["2"]


def test_a_lazy_layer_not_yet_initialised_is_one_clear_error_and_works_after_a_forward():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(regrow.ConfigError, match="0: lazy layer.*run one forward pass"):
        regrow.create("rigl", model, None, sparsity=0.5, total_steps=10)
    model(torch.zeros(2, 8))
    sp = regrow.create("rigl", model, None, sparsity=0.5, total_steps=10)
    assert list(sp.layers) == ["0", "2"]


def test_dead_units_count_outputs_with_no_active_weight_and_inputs_none_reads():
    linear = masking.add_mask(nn.Linear(5, 4))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False            # output 1 computes only its bias
    mask[:, 3] = False         # input 3 is read by no output
    mask[2, :3] = False        # output 2 keeps one weight (input 4): alive
    masking.set_mask(linear, mask)
    assert masking.dead_units(linear) == (1, 1)
    # A grouped conv: an input channel belongs to one group and is read only by that group's outputs.
    conv = masking.add_mask(nn.Conv2d(4, 6, 3, groups=2))
    mask = torch.ones_like(conv.weight, dtype=torch.bool)
    mask[0] = False            # output 0 dead
    mask[3:, 1] = False        # group 1's second input (input channel 3) unread; group 0's second input is read
    masking.set_mask(conv, mask)
    assert masking.dead_units(conv) == (1, 1)
    assert masking.dead_units(nn.Linear(3, 3)) == (0, 0)   # unmasked: dense
