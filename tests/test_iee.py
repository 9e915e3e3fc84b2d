import pytest
import torch
from torch import nn

import regrow
from conftest import TinyNet, batch, train_step
from regrow import masking
from regrow.criteria import magnitude
from regrow.errors import ConfigError
from regrow.schedules import cosine_fraction
from regrow.training import MODEL, TrainConfig, build_trainer, load_model

H, J, Q = 3, 2, 3
L = H + J + Q


def make(model=None, steps=64, **options):
    torch.manual_seed(0)
    model = model or TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    defaults = dict(sparsity=0.8, distribution="erk", estimate_steps=H, improve_steps=J, explore_steps=Q,
                    t_end=48, seed=0)
    defaults.update(options)
    return model, optimizer, regrow.IEE(model, optimizer, total_steps=steps, **defaults)


def counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def frozen_state(model, sp):
    """Everything exploration must not touch: active weights, BN affine and statistics, biases."""
    state = {f"{n}.active": masking.raw(m)[sp.active[n]].clone() for n, m in sp.layers.items()}
    for name, t in model.state_dict().items():
        if not name.endswith(("weight", "weight_mask")) or ".bn" in name or name.startswith("bn"):
            state[name] = t.clone()
    return state


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_cycle_keeps_density_and_prunes_and_grows_omega(criterion):
    model, optimizer, sp = make(criterion=criterion, alpha=0.3)  # at α = 0.1 the tiny layers' late Ω_t round to 0
    start = counts(sp.masks())
    assert start == sp.target_counts()
    for t in range(1, 65):
        train_step(model, optimizer, t)
        before = counts(sp.masks())
        sp.step()
        after = counts(sp.masks())
        pos = sp.position(t)
        if pos == H:
            fraction = cosine_fraction(t, sp.alpha, 48)
            expected = {n: int(fraction * before[n]) for n in before}
            assert sp.omega == expected
            assert after == {n: before[n] - expected[n] for n in before}
        elif pos == L:
            assert after == start  # the same per-layer density before and after every cycle
            record = sp.history[-1]
            assert record["pruned"] == record["grown"] == sum(expected.values()) > 0
    assert len(sp.history) == 48 // L == 6
    assert counts(sp.masks()) == start and not sp.exploring


def test_exploration_freezes_active_and_bn_and_grown_weights_keep_explored_values():
    model, optimizer, sp = make(freeze_active=True)  # the paper's exploration
    for t in range(1, H + J + 1):
        train_step(model, optimizer, t)
        sp.step()
    assert sp.exploring and sp.stage(H + J + 1) == "explore"
    assert all(bool(m.weight_mask.all()) for m in sp.layers.values())  # every pruned unit is in the forward
    frozen = frozen_state(model, sp)
    explored_before = {n: masking.raw(m)[~sp.active[n]].clone() for n, m in sp.layers.items()}
    for t in range(H + J + 1, L + 1):
        train_step(model, optimizer, t)
        now = frozen_state(model, sp)
        assert all(torch.equal(now[k], frozen[k]) for k in frozen), [k for k in frozen if not torch.equal(now[k],
                                                                                                           frozen[k])]
        if t < L:
            sp.step()
    explored = {n: masking.raw(m).detach().clone() for n, m in sp.layers.items()}
    active = {n: a.clone() for n, a in sp.active.items()}
    assert any(not torch.equal(explored[n][~active[n]], explored_before[n]) for n in active)
    sp.step()  # grow
    assert not sp.exploring
    for n, m in sp.layers.items():
        grown = masking.mask_of(m) & ~active[n]
        assert grown.any()
        assert torch.equal(masking.raw(m)[grown], explored[n][grown])  # MRU: exactly the explored values
        assert torch.equal(masking.raw(m), explored[n])  # nothing else moved either: the rest of Θ_P is kept too


def run_first_cycle(**options):
    model, optimizer, sp = make(**options)
    snapshots = {}
    for t in range(1, L + 1):
        train_step(model, optimizer, t)
        snapshots[t] = {n: (masking.raw(m).detach().clone(), masking.mask_of(m).clone()) for n, m in sp.layers.items()}
        if sp.exploring:
            snapshots[t]["active"] = {n: a.clone() for n, a in sp.active.items()}
        sp.step()
        snapshots[t]["after"] = {n: (masking.raw(m).detach().clone(), masking.mask_of(m).clone())
                                 for n, m in sp.layers.items()}
    return sp, snapshots


def test_ablation_no_exploration_grows_by_stale_magnitude():
    sp, snaps = run_first_cycle(explore=False)
    assert all(sp.stage(t) != "explore" for t in range(1, 49))
    for t in range(H + 1, L + 1):  # the pruned units never rejoin the forward before the grow
        assert all(not snaps[t][n][1].all() for n in sp.layers)
    for n in sp.layers:
        weight_before_grow, k_mask = snaps[L][n]
        new_mask = snaps[L]["after"][n][1]
        expected = sp.structure.grow(k_mask, magnitude(weight_before_grow), int(new_mask.sum() - k_mask.sum()))
        assert torch.equal(new_mask, expected)


def test_ablation_no_freeze_lets_active_weights_train_during_exploration():
    for freeze, moves in ((True, False), (False, True)):
        sp, snaps = run_first_cycle(freeze_active=freeze)
        start, end = snaps[H + J + 1], snaps[L]
        changed = any(not torch.equal(start[n][0][start["active"][n]], end[n][0][start["active"][n]])
                      for n in sp.layers)
        assert changed == moves


def test_ablation_zero_init_changes_only_the_values_of_grown_weights():
    sp_mru, mru = run_first_cycle()
    sp_zero, zero = run_first_cycle(grow_init="zero")
    for n in sp_mru.layers:
        assert torch.equal(mru[L]["after"][n][1], zero[L]["after"][n][1])  # same selection
        grown = mru[L]["after"][n][1] & ~mru[L]["active"][n]
        assert (zero[L]["after"][n][0][grown] == 0).all()
        assert torch.equal(mru[L]["after"][n][0][grown], mru[L][n][0][grown])
        assert (mru[L]["after"][n][0][grown] != 0).any()


def test_grown_state_keeps_or_clears_the_momentum_exploration_built():
    """Before the grow both runs are identical; after it, grown units hold zero momentum (fresh) or the
    momentum their exploration built (explored); the units that stay active keep theirs either way."""
    held = {}
    for grown_state in ("fresh", "explored"):
        model, optimizer, sp = make(grown_state=grown_state)
        for t in range(1, L + 1):
            train_step(model, optimizer, t)
            if t == L:
                active = {n: a.clone() for n, a in sp.active.items()}
                before = {n: optimizer.state[masking.raw(m)]["momentum_buffer"].clone() for n, m in sp.layers.items()}
            sp.step()
        after = {n: optimizer.state[masking.raw(m)]["momentum_buffer"] for n, m in sp.layers.items()}
        held[grown_state] = before, after, sp.masks(), active
    (before, fresh, masks, active), (before_x, explored, masks_x, _) = held["fresh"], held["explored"]
    some_grown = False
    for n in masks:
        assert torch.equal(before[n], before_x[n]) and torch.equal(masks[n], masks_x[n])
        grown = masks[n] & ~active[n]
        some_grown |= bool(grown.any())
        assert (fresh[n][grown] == 0).all()
        assert torch.equal(explored[n][grown], before[n][grown]) and (explored[n][grown] != 0).any() == grown.any()
        assert torch.equal(fresh[n][active[n]], explored[n][active[n]])
    assert some_grown


def test_ablation_without_improvement_stage_explores_right_after_pruning():
    model, optimizer, sp = make(improve_steps=0)
    assert sp.cycle_length == H + Q
    for t in range(1, H + 1):
        train_step(model, optimizer, t)
        sp.step()
    assert sp.exploring and sum(sp.omega.values()) > 0  # pruned and reactivated in the same step


def test_nm_groups_stay_full_after_every_cycle():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 12 * 12, 4))
    model, optimizer, sp = make(model=model, sparsity=0.5, structure="2:4")
    assert "0" in sp.skipped  # one input channel: not a multiple of 4
    for t in range(1, 49):
        train_step(model, optimizer, t)
        sp.step()
        if sp.position(t) == L:
            for m in sp.layers.values():
                assert (m.weight_mask.movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()
    assert len(sp.history) == 6


def test_global_ranking_keeps_the_total():
    model, optimizer, sp = make(ranking="global")
    total = sum(counts(sp.masks()).values())
    for t in range(1, 49):
        train_step(model, optimizer, t)
        sp.step()
        if sp.position(t) == L:
            assert sum(counts(sp.masks()).values()) == total


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_resume_in_the_middle_of_exploration_is_bit_identical(tmp_path, criterion):
    options = {"estimate_steps": 3, "improve_steps": 2, "explore_steps": 3, "criterion": criterion}

    def config(**kw):
        return TrainConfig(model="resnet8", dataset="synthetic", synthetic_size=256, method="iee", sparsity=0.8,
                           epochs=3, batch_size=32, log_every=3, progress=False, method_options=options, **kw)
    full = build_trainer(config(), tmp_path / "full").run()
    cut = build_trainer(config(checkpoint_every=7), tmp_path / "cut")
    cut.run(stop_after=7)
    assert cut.sparsifier.exploring  # step 7 of an 8-step cycle: exploring
    resumed = build_trainer(config(checkpoint_every=7), tmp_path / "cut").run(resume=True)
    a, _ = load_model(tmp_path / "full" / MODEL)
    b, _ = load_model(tmp_path / "cut" / MODEL)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for key in ("test_accuracy", "train_flops", "mask_updates", "test_accuracy_per_epoch"):
        assert full[key] == resumed[key]
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_exploration_counts_dense_flops_and_evaluation_sees_the_sparse_net():
    model, optimizer, sp = make()
    for t in range(1, H + J + 1):
        train_step(model, optimizer, t)
        sp.step()
    assert set(sp.forward_densities().values()) == {1.0}
    assert all(d < 1.0 for n, d in sp.densities().items() if sp.target_counts()[n] < masking.raw(sp.layers[n]).numel())
    x, _ = batch(99)
    model.eval()
    with sp.sparse_view():
        sparse_out = model(x)
        assert all(torch.equal(masking.mask_of(m), sp.active[n]) for n, m in sp.layers.items())
    assert all(bool(m.weight_mask.all()) for m in sp.layers.values())
    dense_out = model(x)
    assert not torch.equal(sparse_out, dense_out)


def test_iee_option_errors():
    for bad, message in ((dict(estimate_steps=0), "estimate_steps"), (dict(criterion="hessian"), "criterion"),
                         (dict(ranking="row"), "ranking"), (dict(grow_init="random"), "grow_init"),
                         (dict(grown_state="kept"), "grown_state"),
                         (dict(t_end=5), "no IEE cycle"), (dict(structure="2:4", sparsity=0.5, ranking="global"),
                                                           "global ranking")):
        with pytest.raises(ConfigError, match=message):
            make(**bad)


def test_max_cycles_stops_after_the_full_runs_first_cycles_and_fixes_the_mask():
    full_model, full_optimizer, full = make(alpha=0.3)
    model, optimizer, sp = make(alpha=0.3, max_cycles=2)
    masks = []
    for t in range(1, 65):
        train_step(full_model, full_optimizer, t)
        full.step()
        train_step(model, optimizer, t)
        sp.step()
        if t > 2 * L:
            masks.append(sp.masks())
    assert sp.cycles == 2 and len(sp.history) == 2 < len(full.history) == 6
    assert [r["fraction"] for r in sp.history] == [r["fraction"] for r in full.history[:2]]  # Ω_t to t_end
    assert all(torch.equal(m[n], masks[0][n]) for m in masks for n in m) and not sp.exploring
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="max_cycles"):
            make(max_cycles=bad)


def test_exponential_omega_schedule():
    from regrow.schedules import exponential_fraction

    model, optimizer, sp = make(schedule="exponential", alpha=0.4)
    for t in range(1, 2 * L + 1):
        train_step(model, optimizer, t)
        before = counts(sp.masks())
        sp.step()
        if sp.position(t) == H:
            fraction = exponential_fraction(t, 0.4, 48)
            assert sp.omega == {n: int(fraction * before[n]) for n in before}
    assert [r["fraction"] for r in sp.history] == pytest.approx([exponential_fraction(t, 0.4, 48) for t in (H, L + H)])


def test_no_exploration_can_grow_units_that_were_never_active():
    # Never-active units keep their initial values (never_active="init"), so ranking Θ_P by |w| without exploring
    # can pick them: the mask keeps changing, it does not just take back what the prune took.
    model, optimizer, sp = make(explore=False, never_active="init")
    for t in range(1, 49):
        train_step(model, optimizer, t)
        sp.step()
    metrics = sp.tracker.metrics()
    assert metrics["updates"] == 6
    assert metrics["first_time_share"] > 0
    assert min(metrics["iou_previous"]) < 1.0
    # with zero-valued never-active units the same ablation can only return what it pruned
    model, optimizer, sp = make(explore=False, never_active="zero")
    for t in range(1, 49):
        train_step(model, optimizer, t)
        sp.step()
    assert sp.tracker.metrics()["first_time_share"] == 0.0


@pytest.mark.parametrize("never_active", ["init", "zero"])
def test_exploration_grows_units_never_active_before(never_active):
    model, optimizer, sp = make(never_active=never_active)
    ever = {n: m.clone() for n, m in sp.masks().items()}
    firsts = 0
    for t in range(1, 49):
        train_step(model, optimizer, t)
        sp.step()
        if sp.position(t) == L:
            masks = sp.masks()
            firsts += sum(int((masks[n] & ~ever[n]).sum()) for n in masks)
            ever = {n: ever[n] | masks[n] for n in masks}
    assert firsts > 0
    assert sp.tracker.metrics()["first_time_share"] == pytest.approx(firsts / sp.tracker.metrics()["grown_total"])


def test_a_layer_the_allocation_keeps_dense_is_left_alone():
    model, optimizer, sp = make(dense_first=True, freeze_active=True)  # as ERK does to small layers
    dense = [n for n in sp.layers if n not in sp.cycled]
    assert dense == ["conv1"] and sp.target_counts()["conv1"] == masking.raw(model.conv1).numel()
    momentum = lambda: optimizer.state[masking.raw(model.conv1)]["momentum_buffer"].clone()  # noqa: E731
    for t in range(1, L + 1):
        train_step(model, optimizer, t)
        weight, buf = masking.raw(model.conv1).detach().clone(), momentum()
        sp.step()
        assert bool(model.conv1.weight_mask.all())
        assert torch.equal(masking.raw(model.conv1), weight) and torch.equal(momentum(), buf)  # prune / grow: untouched
        if t == H + J:
            explore_start = weight
    assert "conv1" not in sp.omega and sp.history[-1]["pruned"] > 0
    assert torch.equal(masking.raw(model.conv1), explore_start)  # frozen, like all of Θ_K, while Θ_P explores


def test_without_freeze_the_active_set_and_batchnorm_train_at_the_full_rate():
    torch.manual_seed(0)
    model = TinyNet()
    lr, scale = 0.05, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: the step is exactly -lr × gradient
    sp = regrow.IEE(model, optimizer, total_steps=64, sparsity=0.8, estimate_steps=H, improve_steps=J,
                    explore_steps=Q, t_end=48, freeze_active=False, explore_lr_scale=scale)
    assert sp.freeze_bn is False  # BatchNorm follows freeze_active unless told otherwise
    for t in range(1, H + J + 1):
        train_step(model, optimizer, t)
        sp.step()
    assert sp.exploring
    running_mean = model.bn1.running_mean.clone()
    x, y = batch(100)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, module in sp.layers.items():
        step = masking.raw(module).detach() - before[f"{name}.weight"]
        active = sp.active[name]
        expected = -lr * grads[f"{name}.weight"]
        torch.testing.assert_close(step[active], expected[active], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(step[~active], scale * expected[~active], rtol=1e-4, atol=1e-7)
        assert (step[active] != 0).any()
    for name in ("bn1.weight", "bn1.bias", "conv1.bias", "fc.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach() - before[name], -lr * grads[name])
    assert not torch.equal(model.bn1.running_mean, running_mean)  # statistics update as in normal training


def test_exploration_loss_is_logged_apart(tmp_path):
    options = {"estimate_steps": 3, "improve_steps": 2, "explore_steps": 3}
    config = TrainConfig(model="resnet8", dataset="synthetic", synthetic_size=128, method="iee", sparsity=0.8,
                         epochs=3, batch_size=32, log_every=1, progress=False, method_options=options)
    trainer = build_trainer(config, tmp_path / "run")
    trainer.run()
    import json
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in lines if "lr" in r}
    for step, record in steps.items():
        exploring = trainer.sparsifier.position(step) is not None and trainer.sparsifier.position(step) > H + J
        assert (record.get("explore_loss") is not None) == exploring
        assert (record["loss"] is None) == exploring
