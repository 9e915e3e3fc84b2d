import pytest
import torch
from torch import nn

import regrow
from conftest import TinyNet, batch, train_on, train_step, train_steps
from regrow import masking
from regrow.criteria import magnitude
from regrow.errors import ConfigError
from regrow.schedules import cosine_fraction, gmp_sparsity


def make(method, steps=60, **options):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sp = regrow.create(method, model, optimizer, total_steps=steps, **options)
    return model, optimizer, sp


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_drop_and_grow_keeps_density_and_follows_the_cosine_fraction(method):
    model, optimizer, sp = make(method, sparsity=0.8, distribution="erk", interval=5, t_end=40, seed=3)
    counts = {n: int(m.weight_mask.sum()) for n, m in sp.layers.items()}
    assert counts == sp.target_counts()
    for t in range(1, 61):
        train_step(model, optimizer, t)
        old = sp.masks()
        weights = {n: masking.raw(m).detach().clone() for n, m in sp.layers.items()}
        grads = {n: masking.dense_grad(m) for n, m in sp.layers.items()}
        if method == "rigl":
            assert all((g is not None) == (t % 5 == 0 and t < 40) for g in grads.values())
        n_updates = len(sp.history)
        sp.step()
        assert {n: int(m.weight_mask.sum()) for n, m in sp.layers.items()} == counts
        if t % 5 or t >= 40:
            assert len(sp.history) == n_updates  # no update off-schedule or after T_end
            assert all(torch.equal(old[n], masking.mask_of(m)) for n, m in sp.layers.items())
            continue
        record = sp.history[-1]
        assert record["step"] == t and record["fraction"] == pytest.approx(cosine_fraction(t, 0.3, 40))
        for name, m in sp.layers.items():
            k = int(record["fraction"] * counts[name])
            assert record["layers"][name]["k"] == k
            new = masking.mask_of(m)
            grown = new & ~old[name]
            assert int((old[name] & ~new).sum()) == int(grown.sum()) <= k
            assert (masking.raw(m)[grown] == 0).all()
            assert (optimizer.state[masking.raw(m)]["momentum_buffer"][grown] == 0).all()
            if method == "rigl":
                after_drop = sp.structure.prune(old[name], magnitude(weights[name]), k)
                assert torch.equal(new, sp.structure.grow(after_drop, grads[name].abs(), k))
        assert record["dropped"] == record["grown"] == sum(r["k"] for r in record["layers"].values())
    assert [r["step"] for r in sp.history] == list(range(5, 40, 5))


def test_set_growth_is_random_and_seeded():
    def grown_after_one_update(seed):
        model, optimizer, sp = make("set", sparsity=0.8, interval=2, t_end=10, seed=0)
        sp.generator.manual_seed(seed)
        for t in range(1, 3):
            train_step(model, optimizer, t)
            old = sp.masks()
            sp.step()
        return torch.cat([(masking.mask_of(m) & ~old[n]).flatten() for n, m in sp.layers.items()])
    assert torch.equal(grown_after_one_update(1), grown_after_one_update(1))
    assert not torch.equal(grown_after_one_update(1), grown_after_one_update(2))


def test_gmp_follows_cubic_and_ends_exactly_at_target():
    model, optimizer, sp = make("gmp", sparsity=0.9, distribution="erk", interval=5, begin=0, end=42)
    assert sp.actual_sparsity() == 0.0
    prev = sp.masks()
    for t in range(1, 61):
        train_step(model, optimizer, t)
        sp.step()
        masks = sp.masks()
        assert all(not (masks[n] & ~prev[n]).any() for n in masks)  # pruned weights never return
        prev = masks
        if sp.is_prune_step(t):
            expected = sp.target_counts(gmp_sparsity(t, 0.0, 0.9, 0, 42))
            assert {n: int(m.sum()) for n, m in masks.items()} == expected
    assert [r["step"] for r in sp.history] == [5, 10, 15, 20, 25, 30, 35, 40, 42]
    assert {n: int(m.sum()) for n, m in sp.masks().items()} == sp.target_counts()
    assert sp.history[-1]["target"] == pytest.approx(0.9)


def test_static_mask_never_changes_and_oneshot_prunes_once_by_magnitude():
    model, optimizer, sp = make("static", sparsity=0.7, distribution="uniform")
    start = sp.masks()
    train_steps(model, optimizer, sp, 20)
    assert all(torch.equal(start[n], m) for n, m in sp.masks().items())

    model, optimizer, sp = make("oneshot", steps=20, sparsity=0.7, distribution="uniform", prune_at=0.5)
    train_steps(model, optimizer, sp, 9)
    assert sp.actual_sparsity() == 0.0
    train_step(model, optimizer, 10)
    weights = {n: masking.raw(m).detach().clone() for n, m in sp.layers.items()}
    sp.step()
    for n, m in sp.layers.items():
        mask = masking.mask_of(m)
        assert int(mask.sum()) == sp.target_counts()[n]
        assert weights[n][mask].abs().min() >= weights[n][~mask].abs().max()


def test_nm_structure_with_rigl_keeps_n_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = regrow.RigL(model, optimizer, sparsity=0.5, structure="2:4", interval=2, t_end=20, total_steps=30)
    for _t in range(1, 21):
        x = torch.randn(8, 16)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sp.step()
        for m in sp.layers.values():
            assert (m.weight_mask.reshape(-1, 4).sum(1) == 2).all()
    assert sp.history


def test_method_option_errors():
    model = TinyNet()
    with pytest.raises(ConfigError, match="unknown method 'rigel'"):
        regrow.create("rigel", model)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        regrow.create("rigl", model, sparsity=1.3)
    with pytest.raises(ConfigError, match="fraction of training: pass total_steps"):
        regrow.create("rigl", TinyNet(), sparsity=0.5)
    with pytest.raises(ConfigError, match="2:4 sparsity is 0.5"):
        regrow.create("static", TinyNet(), sparsity=0.9, structure="2:4")
    with pytest.raises(ConfigError, match="takes no option 'alpha'"):
        regrow.create("gmp", TinyNet(), sparsity=0.5, total_steps=10, alpha=0.3)
    with pytest.raises(ConfigError, match="unknown distribution"):
        regrow.create("static", TinyNet(), sparsity=0.5, distribution="normal")


def test_rigl_without_backward_is_a_clear_error():
    model, optimizer, sp = make("rigl", sparsity=0.8, interval=1, t_end=10)
    with pytest.raises(ConfigError, match="no dense gradient"):
        sp.step()


@pytest.mark.parametrize("method", ["static", "set", "rigl", "iee"])
def test_sparse_start_is_w_times_m_with_inactive_weights_zero(method):
    options = {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2} if method == "iee" else {}
    if method == "iee":
        options["never_active"] = "zero"
    model, optimizer, sp = make(method, sparsity=0.8, **options)
    for m in sp.layers.values():
        assert (masking.raw(m)[~masking.mask_of(m)] == 0).all()
        assert (masking.raw(m)[masking.mask_of(m)] != 0).all()


def test_iee_never_active_init_keeps_the_initial_values():
    torch.manual_seed(0)
    initial = {n: p.detach().clone() for n, p in TinyNet().named_parameters()}
    model, optimizer, sp = make("iee", sparsity=0.8, estimate_steps=2, improve_steps=1, explore_steps=2,
                                never_active="init")
    for name, m in sp.layers.items():
        assert not masking.mask_of(m).all()
        assert torch.equal(masking.raw(m).detach(), initial[f"{name}.weight"])  # masked, not zeroed


def test_iee_never_active_scale_shrinks_only_the_never_active_initial_values():
    torch.manual_seed(0)
    initial = {n: p.detach().clone() for n, p in TinyNet().named_parameters()}
    model, optimizer, sp = make("iee", sparsity=0.8, estimate_steps=2, improve_steps=1, explore_steps=2,
                                never_active="init", never_active_scale=0.25)
    for name, m in sp.layers.items():
        mask, weight, start = masking.mask_of(m), masking.raw(m).detach(), initial[f"{name}.weight"]
        assert not mask.all()
        assert torch.equal(weight[mask], start[mask])  # the sparse network is the one never_active=init starts
        assert torch.equal(weight[~mask], start[~mask] * 0.25)


@pytest.mark.parametrize("options, message", [
    ({"never_active_scale": 0.0}, r"never_active_scale must be in \(0, 1\]"),
    ({"never_active_scale": 1.5}, r"never_active_scale must be in \(0, 1\]"),
    ({"never_active": "zero", "never_active_scale": 0.5}, "there are none to scale: pass never_active=init too"),
])
def test_iee_never_active_scale_refuses_what_it_cannot_mean(options, message):
    with pytest.raises(ConfigError, match=message):
        make("iee", sparsity=0.8, estimate_steps=2, improve_steps=1, explore_steps=2, **options)


@pytest.mark.parametrize("method", ["rigl", "iee"])
def test_a_schedule_object_replaces_the_named_update_fraction(method):
    """``schedule`` takes any callable step -> fraction (the named ones are objects too): the method asks it at
    every update and moves that share."""
    from regrow.schedules import CosineFraction

    asked = []

    def constant(step):
        asked.append(step)
        return 0.25

    options = {"interval": 5} if method == "rigl" else {"estimate_steps": 3, "improve_steps": 1, "explore_steps": 1}
    model, optimizer, sp = make(method, sparsity=0.8, t_end=40, schedule=constant, **options)
    for t in range(1, 41):
        train_step(model, optimizer, t)
        sp.step()
    assert asked and [h["fraction"] for h in sp.history] == [0.25] * len(sp.history)
    assert sp.update_fraction is constant
    _, _, named = make(method, sparsity=0.8, t_end=40, **options)
    assert named.update_fraction == CosineFraction(named.alpha, 40)
    with pytest.raises(ConfigError, match="schedule must be a name"):
        make(method, sparsity=0.8, t_end=40, schedule=3, **options)


@pytest.mark.parametrize("method", ["rigl", "set", "iee"])
def test_a_method_that_grows_refuses_a_frozen_weight_or_one_outside_the_optimizer(method):
    # grown units of a weight that cannot train would sit at 0 for good (RigL would have no gradient to rank by)
    torch.manual_seed(0)
    model = TinyNet()
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d))
    frozen = model.get_submodule(first).weight
    frozen.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    options = {"sparsity": 0.8, "total_steps": 60}
    if method == "iee":
        options.update(estimate_steps=4, improve_steps=3, explore_steps=4)
    with pytest.raises(ConfigError, match=f"the weight of {first} is frozen"):
        regrow.create(method, model, optimizer, **options)
    frozen.requires_grad_(True)  # trainable now, but the optimizer was built without it
    with pytest.raises(ConfigError, match=f"the weight of {first} is not in the optimizer"):
        regrow.create(method, model, optimizer, **options)
    sp = regrow.create(method, model, optimizer, exclude=[first], **options)
    assert first not in sp.layers
    static = regrow.create("static", TinyNet(), None, sparsity=0.8)  # a fixed mask trains nothing back: no check
    assert static.layers


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_a_channel_cut_off_on_both_sides_gets_no_gradient_so_only_random_growth_revives_it(method):
    # conv -> BN -> ReLU -> conv: once channel 2 has no incoming and no outgoing active weight, it outputs a
    # constant (the ReLU of its BatchNorm shift: 0 here, as for such channels of the trained ResNet-8). No active
    # weight carries gradient back into it, and its constant output gives none to the weights that would read
    # it, so the dense gradient of every weight into or out of it is exactly 0: RigL (growth by |dense gradient|)
    # never grows it back, SET's random growth does. Why very sparse narrow conv nets keep dead channels under RigL.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = regrow.create(method, model, optimizer, total_steps=40, sparsity=0.5, distribution="uniform",
                       interval=2, alpha=0.5, seed=0)
    first, second = masking.mask_of(model[0]).clone(), masking.mask_of(model[3]).clone()
    first[2], second[:, 2] = False, False
    masking.set_mask(model[0], first)
    masking.set_mask(model[3], second)
    with torch.no_grad():
        model[1].bias[2] = -1.0
    revived = False
    for t in range(30):
        train_on(model, optimizer, sp, [batch(t)])
        revived |= bool(masking.mask_of(model[0])[2].any() or masking.mask_of(model[3])[:, 2].any())
    assert len(sp.history) == 14  # every 2 steps until t_end = 30
    assert revived == (method == "set")
    assert masking.dead_units(model[0])[0] >= (1 if method == "rigl" else 0)
