import json
import platform
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
from conftest import CountingMeasure, train_on
from regrow import masking
from regrow.channels.costs import LatencyTable, layer_shapes
from regrow.errors import ConfigError
from regrow.methods.channel import CHANNEL_PAPER_CYCLE, DEFAULT_RAMP_CYCLES
from regrow.models import create_model


def batch(t, n=16):
    g = torch.Generator().manual_seed(t)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(model, optimizer, sp, steps, start=0, each=None):
    for t in range(start, start + steps):
        x, y = batch(t)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sp.step()
        if each is not None:
            each(sp.step_count)


def setup(method="iee", seed=0, model_name="resnet8", **options):
    torch.manual_seed(seed)
    model = create_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    defaults = {"latency_target": 0.5, "cost": "macs", "group_size": 2, "total_steps": 60, "input_shape": (1, 28, 28)}
    if method == "iee":
        defaults.update(estimate_steps=4, improve_steps=3, explore_steps=4, t_end=1.0)
    else:
        defaults.update(prune_every=5, prune_steps=6)
    sp = regrow.create(method, model, optimizer, structure="channel", seed=seed, **{**defaults, **options})
    return model, optimizer, sp


def test_latency_table_is_reused_from_cache_and_rebuilt_for_another_device_or_shape(tmp_path):
    model = create_model("resnet8")
    shapes = layer_shapes(model, torch.zeros(1, 1, 28, 28))
    first = CountingMeasure()
    table = LatencyTable(shapes, cache_dir=tmp_path, measure=first, key="cpu|test-a")
    costs = [table("layer1.0.conv1", 16, c) for c in (4, 8, 16)] + [table("fc", 64, 10)]
    table.save()
    assert first.calls == 4
    again = CountingMeasure()
    cached = LatencyTable(shapes, cache_dir=tmp_path, measure=again, key="cpu|test-a")
    assert [cached("layer1.0.conv1", 16, c) for c in (4, 8, 16)] + [cached("fc", 64, 10)] == costs
    assert again.calls == 0 and cached.measurements == 0
    other_device = CountingMeasure()
    LatencyTable(shapes, cache_dir=tmp_path, measure=other_device, key="cuda|test-b")("layer1.0.conv1", 16, 4)
    assert other_device.calls == 1
    bigger = layer_shapes(model, torch.zeros(1, 1, 32, 32))  # same layers, another input size
    other_shape = CountingMeasure()
    LatencyTable(bigger, cache_dir=tmp_path, measure=other_shape, key="cpu|test-a")("layer1.0.conv1", 16, 4)
    assert other_shape.calls == 1


def test_real_latency_measurement_is_positive_and_kept_in_the_cache(tmp_path):
    # Whether latency grows with width is a timing, measured in bench/latency_fidelity.py: a test that compared
    # two timings failed when other work shared the cores.
    model = create_model("resnet8")
    table = LatencyTable(layer_shapes(model, torch.zeros(1, 1, 28, 28)), cache_dir=tmp_path, batch_size=8,
                         repeats=5)
    small, large = table("layer3.0.conv2", 8, 8), table("layer3.0.conv2", 64, 64)
    assert 0 < small < float("inf") and 0 < large < float("inf")
    table.save()
    assert list(tmp_path.glob("latency-*.json"))
    again = LatencyTable(layer_shapes(model, torch.zeros(1, 1, 28, 28)), cache_dir=tmp_path, batch_size=8,
                         repeats=5)
    assert again("layer3.0.conv2", 64, 64) == large  # read back from the cache, not measured again


def test_cells_share_one_reference_latency_kept_in_the_cache(tmp_path, monkeypatch):
    from regrow.channels import costs as latency

    calls = []
    real = latency.time_layer

    def spy(shape, c_in, c_out, batch_size, device, repeats=15, warmup=3, reference_ms=None):
        calls.append((shape == latency.REFERENCE_SHAPE, reference_ms))
        return real(shape, c_in, c_out, batch_size, device, repeats=repeats, warmup=1, reference_ms=reference_ms)

    monkeypatch.setattr(latency, "time_layer", spy)
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))
    table = LatencyTable(shapes, cache_dir=tmp_path, batch_size=2, repeats=3)
    assert 0 < table("layer3.0.conv2", 8, 8) and 0 < table("layer3.0.conv2", 8, 16)
    reference = table.reference_ms
    # the reference is measured once, on its own; every cell is then timed against it
    assert calls == [(True, None), (False, reference), (False, reference)] and reference > 0
    table.save()
    again = LatencyTable(shapes, cache_dir=tmp_path, batch_size=2, repeats=3)
    assert again.reference_ms == reference
    again("layer3.0.conv2", 16, 16)
    assert calls[3:] == [(False, reference)]  # a new cell of a cached table keeps the cached scale


def test_a_cache_of_another_format_is_measured_anew(tmp_path):
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))
    table = LatencyTable(shapes, cache_dir=tmp_path, measure=CountingMeasure(), key="cpu|test-a")
    table("layer1.0.conv1", 16, 4)
    table.save()
    data = json.loads(table.path.read_text())
    data.pop("format")  # a cache written before cells were timed against a reference
    table.path.write_text(json.dumps(data))
    counting = CountingMeasure()
    LatencyTable(shapes, cache_dir=tmp_path, measure=counting, key="cpu|test-a")("layer1.0.conv1", 16, 4)
    assert counting.calls == 1


def test_allocator_mode_is_part_of_the_latency_cache_key(monkeypatch):
    from regrow import env
    from regrow.channels import costs as latency

    steady = env.steady_allocator()
    assert latency.device_key("cpu", 64).count("allocator=steady" if steady else "allocator=default") == 1
    if sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()):
        assert steady  # mallopt is there on glibc: timings run without page faults per forward
    monkeypatch.setattr(env, "_steady", None)
    monkeypatch.setenv("REGROW_STEADY_ALLOCATOR", "0")
    assert env.steady_allocator() is False
    assert "allocator=default" in latency.device_key("cpu", 64)  # a table measured otherwise is not reused


@pytest.mark.parametrize("target", [0.0, 1.0, 1.3, -0.5])
def test_latency_target_outside_zero_one_is_an_error(target):
    with pytest.raises(ConfigError, match="latency_target"):
        setup(latency_target=target)


def test_unreachable_target_and_unknown_cost_are_errors():
    with pytest.raises(ConfigError, match="below what this model reaches with one group"):
        setup(latency_target=0.01, group_size=8)
    with pytest.raises(ConfigError, match="unknown cost model 'flops'"):
        setup(cost="flops")
    with pytest.raises(ConfigError, match="structure='channel' in Python"):
        regrow.create("halp", create_model("resnet8"), None)


def test_halp_prunes_along_the_exponential_path_to_the_budget_and_never_regrows():
    model, optimizer, sp = setup("halp")
    kept = []
    train(model, optimizer, sp, 40, each=lambda s: kept.append(sp.kept_counts()))
    targets = [h["target"] for h in sp.history]
    assert len(sp.history) == 6 and targets == sorted(targets, reverse=True)
    assert targets[-1] == pytest.approx(sp.budget)
    assert all(h["predicted_cost"] <= h["target"] + 1e-9 for h in sp.history)
    assert sp.predicted_cost() <= sp.budget
    for before, after in zip(kept, kept[1:]):
        assert all(a <= b for a, b in zip(after, before))  # channels only leave
    assert kept[-1] == kept[30]  # fixed after the last pruning
    widths = sp.budget_report()["widths_history"]  # the summary's record of every pruning's widths
    assert [w["step"] for w in widths] == [5 * k for k in range(1, 7)]
    assert [w["kept_channels"] for w in widths] == [kept[w["step"] - 1] for w in widths]


@pytest.mark.parametrize("method", ["halp", "iee"])
def test_finalize_leaves_a_plain_model_with_the_same_outputs(method):
    model, optimizer, sp = setup(method)
    train(model, optimizer, sp, 12)
    model.eval()
    x = batch(999)[0]
    with sp.sparse_view(), torch.no_grad():
        expected = model(x)
    sp.finalize()
    assert not any(masking.is_masked(m) for m in model.modules())  # norms included, not only convs
    assert not any(name.endswith("_mask") for name in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    fresh = create_model("resnet8")
    fresh.load_state_dict(model.state_dict())  # strict: the plain class's keys


def test_iee_channel_keeps_the_budget_and_explores_with_the_active_channels_frozen():
    model, optimizer, sp = setup("iee", **CHANNEL_PAPER_CYCLE)  # the paper's exploration: Θ_K frozen
    snapshots = {}

    def watch(step):
        if sp.exploring and step not in snapshots and sp.position(step) == sp.H + sp.J:
            snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            snapshots[step]["masks"] = {k: v.clone() for k, v in sp._active_masks.items()}
            snapshots[step]["stats"] = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        if sp.position(step) == sp.cycle_length - 1 and snapshots:  # last explore step before growth
            start = max(snapshots)
            snap = snapshots[start]
            modules = dict(model.named_modules())
            changed_explored = False
            for (name, param), active in snap["masks"].items():
                now, before = getattr(modules[name], param), snap[f"{name}.{param}"]
                assert torch.equal(now[active], before[active]), (name, param)
                changed_explored |= not torch.equal(now[~active], before[~active])
            assert changed_explored
            for name, module in modules.items():
                if isinstance(module, nn.BatchNorm2d) and (name, "weight") in snap["masks"]:
                    active = snap["masks"][(name, "weight")]
                    assert torch.equal(module.running_mean[active], snap["stats"][f"{name}.running_mean"][active])

    train(model, optimizer, sp, 60, each=watch)
    assert len(sp.history) == sp.cycles >= 4 and snapshots
    for record in sp.history:  # each cycle's budget: on the default ramp's path down to the target, then the target
        budget = record.get("budget", sp.budget)
        assert budget >= sp.budget
        assert record["cost_after_prune"] <= (1 - record["fraction"]) * budget + 1e-9
        assert record["cost_after_grow"] <= budget + 1e-9
        assert record["cost_after_grow"] > 0.9 * budget  # the knapsack fills the budget, not far below it
    assert sum(record["grown_channels"] for record in sp.history) > 0
    assert sp.predicted_cost() <= sp.budget


@pytest.mark.parametrize("explore_from", ["remembered", "zero"])
def test_iee_channel_resume_mid_exploration_is_bit_identical(tmp_path, explore_from):
    def run(split):
        model, optimizer, sp = setup("iee", seed=3, explore_from=explore_from)
        train(model, optimizer, sp, split)
        if split < 30:
            assert sp.exploring
            state = {"model": model.state_dict(), "opt": optimizer.state_dict(), "sp": sp.state_dict()}
            model, optimizer, sp = setup("iee", seed=3, explore_from=explore_from)
            masking.load_state_dict(model, state["model"])
            optimizer.load_state_dict(state["opt"])
            sp.load_state_dict(state["sp"])
        train(model, optimizer, sp, 30 - split, start=split)
        return model.state_dict(), sp.history

    uninterrupted, history = run(30)
    split_cycle = 11 + 4 + 3 + 2  # second cycle, inside its exploration
    resumed, history_resumed = run(split_cycle)
    assert history == history_resumed
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key


def test_precomputed_width_grid_covers_every_cost_the_methods_ask_for(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8")
    measure = CountingMeasure()
    table = LatencyTable(layer_shapes(model, torch.zeros(1, 1, 28, 28)), cache_dir=tmp_path, measure=measure,
                         key="cpu|grid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = regrow.create("iee", model, optimizer, structure="channel", cost_model=table, latency_target=0.5,
                       group_size=4, total_steps=40, estimate_steps=3, improve_steps=2, explore_steps=3,
                       input_shape=(1, 28, 28))
    cells = sp.precompute_costs()
    held = sum(len(row) for row in table.entries.values())
    assert 0 < held <= cells  # layers of one shape share cells
    assert measure.calls == table.measurements == held + 2 * len(dense_cells(sp))  # and the dense ones, twice more
    before = measure.calls
    train(model, optimizer, sp, 40)
    assert len(sp.history) >= 3 and measure.calls == before  # every later ask was a cache hit


def test_an_interrupted_table_build_keeps_what_it_measured(tmp_path, monkeypatch):
    from regrow.channels.budget import ChannelBudget

    monkeypatch.setattr(ChannelBudget, "SAVE_EVERY_CELLS", 10)
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))

    class Interrupted(CountingMeasure):
        def __call__(self, *args):
            if self.calls == 100:
                raise KeyboardInterrupt  # the machine's session ended mid-build
            return super().__call__(*args)

    def halp(measure):
        table = LatencyTable(shapes, cache_dir=tmp_path, measure=measure, key="cpu|interrupted")
        table.reference_ms = 1.0
        return regrow.create("halp", create_model("resnet8"), None, structure="channel", cost_model=table,
                             latency_target=0.5, group_size=4, input_shape=(1, 28, 28))

    with pytest.raises(KeyboardInterrupt):
        halp(Interrupted()).precompute_costs()
    again = CountingMeasure()
    sp = halp(again)
    kept = sum(len(row) for row in sp.cost_model.entries.values())
    assert 90 <= kept < 100  # saved every 10 cells of the build: what was measured before the last save is kept
    sp.precompute_costs()
    every = sum(len(row) for row in sp.cost_model.entries.values())
    # the rerun measured only the rest, nothing twice; then the dense cells twice more, as every build that measures
    assert again.calls == every - kept + 2 * len(dense_cells(sp))


def dense_cells(sp) -> set:
    widths = sp.allocator.channel_widths([g.size for g in sp.groups])
    return {(sp.cost_model.shapes[name].key(), c_in, c_out) for name, (c_in, c_out) in widths.items()}


def test_a_table_build_times_the_dense_cells_again_and_the_budget_follows(tmp_path):
    """A cell is timed once; a busy stretch at the build's start (when the dense cells are timed first) would stay in
    every budget. The build's end times them twice more and keeps each one's median; the budget is read again."""
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))

    class BusyAtFirst(CountingMeasure):  # the first timing of every cell three times too slow
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __call__(self, shape, c_in, c_out, *args):
            first = (shape.key(), c_in, c_out) not in self.seen
            self.seen.add((shape.key(), c_in, c_out))
            return super().__call__(shape, c_in, c_out, *args) * (3 if first else 1)

    def halp(measure, cache):
        table = LatencyTable(shapes, cache_dir=tmp_path / cache, measure=measure, key="cpu|busy")
        return regrow.create("halp", create_model("resnet8"), None, structure="channel", cost_model=table,
                             latency_target=0.5, group_size=4, input_shape=(1, 28, 28))

    busy, steady = halp(BusyAtFirst(), "busy"), halp(CountingMeasure(), "steady")
    assert busy.dense_cost == pytest.approx(3 * steady.dense_cost)  # as first timed
    busy.precompute_costs()
    steady.precompute_costs()
    assert busy.dense_cost == pytest.approx(steady.dense_cost)  # the median of 3x, 1x, 1x: the steady timing
    assert busy.budget == pytest.approx(0.5 * steady.dense_cost) == pytest.approx(steady.budget)
    calls = busy.cost_model.measurements
    again = halp(BusyAtFirst(), "busy")  # the table is built: nothing measured, nothing timed again
    again.precompute_costs()
    assert again.cost_model.measurements == 0 and again.dense_cost == pytest.approx(busy.dense_cost)
    assert calls == sum(len(row) for row in busy.cost_model.entries.values()) + 2 * len(dense_cells(busy))
    macs = regrow.create("halp", create_model("resnet8"), None, structure="channel", cost="macs",
                         latency_target=0.5, group_size=4, input_shape=(1, 28, 28))
    before = macs.dense_cost
    macs.precompute_costs()  # MACs are not timed: nothing to time again
    assert macs.dense_cost == before


@pytest.mark.parametrize("model_name", ["resnet8", "mobilenetv2-small"])  # residual streams; depthwise convs
def test_iee_channel_explore_from_zero_starts_exploring_from_the_pruned_network(model_name):
    x = batch(999)[0]
    outputs = {}
    for explore_from in ("remembered", "zero"):
        model, optimizer, sp = setup("iee", seed=1, model_name=model_name, explore_from=explore_from)
        train(model, optimizer, sp, sp.H + sp.J)  # the exploration opens at the end of this step
        assert sp.exploring
        model.eval()
        with torch.no_grad():
            exploring = model(x)
            with sp.sparse_view():
                pruned = model(x)
        outputs[explore_from] = (exploring, pruned)
        if explore_from == "zero":
            modules = dict(model.named_modules())
            columns = [(modules[name], torch.tensor(idxs)[~keep]) for group, keep in zip(sp.groups, sp.active)
                       for name, role, idxs in group.members
                       if role == "in" and isinstance(modules[name], nn.Conv2d) and modules[name].groups == 1]
            assert columns and all(not masking.raw(conv)[:, i].any() for conv, i in columns)
            model.train()
            train(model, optimizer, sp, sp.Q, start=sp.H + sp.J)  # the exploration trains them from zero
            assert all(masking.raw(conv)[:, i].any() for conv, i in columns if len(i))
            assert sp.history[0]["grown_channels"] > 0
    exploring, pruned = outputs["zero"]
    assert torch.allclose(exploring, pruned, atol=1e-6)  # every explored channel outputs zero at first
    exploring, pruned = outputs["remembered"]
    assert not torch.allclose(exploring, pruned, atol=1e-3)  # the paper's: pruned channels back with their values
    with pytest.raises(ConfigError, match="explore_from"):
        setup("iee", model_name=model_name, explore_from="random")


@pytest.mark.parametrize("switch", ["explore", "freeze_active"])
def test_iee_channel_ablation_switches(switch):
    model, optimizer, sp = setup("iee", **{switch: False})
    seen = {"all_on": False, "active_moved": False}

    def watch(step):
        if sp.stage(step) == "explore" or sp.exploring:
            seen["all_on"] |= all(bool(k.all()) for k in sp.channels.keep)
        if sp.exploring and sp.position(step) == sp.H + sp.J:
            seen["snapshot"] = {n: (m.weight.detach().clone(), sp._active_masks[(n, "weight")])
                                for n, m in sp.layers.items()}
        if sp.exploring and sp.position(step) == sp.cycle_length - 1 and "snapshot" in seen:
            seen["active_moved"] |= any(not torch.equal(m.weight[a], w[a])
                                        for (w, a), m in zip(seen["snapshot"].values(), sp.layers.values()))

    train(model, optimizer, sp, 60, each=watch)
    assert len(sp.history) == sp.cycles
    assert all(h["cost_after_grow"] <= h.get("budget", sp.budget) + 1e-9 for h in sp.history)
    if switch == "explore":  # no exploration: the pruned channels never rejoin the forward
        assert not seen["all_on"] and "snapshot" not in seen
    else:  # exploration happens and the active channels train during it
        assert seen["all_on"] and seen["active_moved"]


def test_a_noisy_non_monotone_latency_table_still_meets_every_target(tmp_path):
    """Measured tables are noisy (a wider layer can time faster); the knapsack must still land within budget."""
    def noisy(shape, c_in, c_out, batch_size, device, repeats):
        jitter = ((c_in * 7919 + c_out * 104729) % 13) / 13  # deterministic pseudo-noise, up to ±50 %
        return (1e-3 * c_in * c_out * (shape.in_size[0] if shape.in_size else 1) + 0.05) * (0.5 + jitter)

    for target in (0.6, 0.3):
        torch.manual_seed(0)
        model = create_model("resnet8")
        table = LatencyTable(layer_shapes(model, torch.zeros(1, 1, 28, 28)), cache_dir=tmp_path, measure=noisy,
                             key="cpu|noisy")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = regrow.create("halp", model, optimizer, structure="channel", cost_model=table, latency_target=target,
                           group_size=2, prune_first=True, total_steps=30, prune_every=2, prune_steps=12,
                           input_shape=(1, 28, 28))
        train(model, optimizer, sp, 30)
        assert all(h["predicted_cost"] <= h["target"] + 1e-9 for h in sp.history)
        assert sp.predicted_cost() <= sp.budget


@pytest.mark.parametrize("bad", [1e-6, float("nan"), -2.0, 0.0, 1e9, "fast"])
def test_a_cache_cell_that_cannot_be_a_measurement_is_measured_again(tmp_path, bad):
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))
    table = LatencyTable(shapes, cache_dir=tmp_path, measure=CountingMeasure(), key="cpu|test-b")
    table.reference_ms = 1.0
    table("layer1.0.conv1", 16, 4), table("layer1.0.conv1", 16, 8)
    table.save()
    data = json.loads(table.path.read_text())
    row = data["entries"][shapes["layer1.0.conv1"].key()]
    row["16,4"] = bad  # edited or damaged: 1e-6 ms would make a layer look free
    table.path.write_text(json.dumps(data))
    counting = CountingMeasure()
    with pytest.warns(UserWarning, match="1 cell"):
        again = LatencyTable(shapes, cache_dir=tmp_path, measure=counting, key="cpu|test-b")
    again("layer1.0.conv1", 16, 4), again("layer1.0.conv1", 16, 8)
    assert counting.calls == 1  # only the bad cell was measured again
    assert again.fingerprint()["cells"] == 2 and len(again.fingerprint()["sha256"]) == 64


def test_a_tables_fingerprint_names_a_file_under_home_from_tilde(tmp_path, monkeypatch):
    shapes = layer_shapes(create_model("resnet8"), torch.zeros(1, 1, 28, 28))
    monkeypatch.setenv("HOME", str(tmp_path))
    table = LatencyTable(shapes, cache_dir=tmp_path / ".cache" / "latency", measure=CountingMeasure(), key="cpu|x")
    assert table.fingerprint()["path"] == str(Path("~") / ".cache" / "latency" / table.path.name)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))  # a table outside home keeps its full path
    assert table.fingerprint()["path"] == str(table.path)


def test_iee_channel_can_ramp_its_budget_down_like_halp():
    model, optimizer, sp = setup("iee", ramp_cycles=3)
    train(model, optimizer, sp, 60)
    budgets = [h["budget"] for h in sp.history]
    assert len(budgets) == 5 and budgets[0] > budgets[1] > budgets[2] == pytest.approx(sp.budget)
    assert budgets[3:] == [sp.budget, sp.budget]
    assert budgets[0] == pytest.approx(sp.dense_cost * (sp.budget / sp.dense_cost) ** (1 / 3))  # HALP's path
    assert all(h["cost_after_grow"] <= b * (1 + 1e-9) for h, b in zip(sp.history, budgets))
    assert sp.predicted_cost() <= sp.budget
    _, _, straight = setup("iee", ramp_cycles=0)
    assert straight.budget_at(1) == straight.budget  # the paper's first cut: straight to the budget
    with pytest.raises(ConfigError, match="ramp_cycles=9 is more than the 5 IEE cycles"):
        setup("iee", ramp_cycles=9)


def test_iee_channel_ramps_its_first_cut_by_default_over_the_cycles_that_fit():
    _, _, default = setup("iee")  # 5 cycles fit: the default ramp, DEFAULT_RAMP_CYCLES of them
    assert default.ramp_cycles == DEFAULT_RAMP_CYCLES == 5
    assert default.budget_at(1) > default.budget and default.budget_at(4 * default.cycle_length + 1) == pytest.approx(
        default.budget)
    _, _, short = setup("iee", max_cycles=2)  # fewer fit: the ramp over those, reaching the budget at the last
    assert short.ramp_cycles == 2 and short.budget_at(short.cycle_length + 1) == pytest.approx(short.budget)
    _, _, one = setup("iee", max_cycles=1)  # one cycle: its cut is straight to the budget
    assert one.ramp_cycles == 1 and one.budget_at(1) == pytest.approx(one.budget)
    for bad in (-1, 2.5, True, "5"):
        with pytest.raises(ConfigError, match="ramp_cycles must be a number of cycles"):
            setup("iee", ramp_cycles=bad)


def test_iee_channel_regrow_within_groups_keeps_the_widths_of_its_first_cut_and_swaps_channels():
    model, optimizer, sp = setup("iee", regrow="within_groups", ramp_cycles=0)  # one cut, then exchanges only
    keeps = []
    train(model, optimizer, sp, 60, each=lambda step: keeps.append(
        sp.active_keep() if sp.position(step) == sp.cycle_length else None))
    widths = [h["kept_channels"] for h in sp.history]
    assert len(widths) == sp.cycles >= 4 and sp.history[0]["cutting"] and not sp.history[1]["cutting"]
    assert all(w == widths[0] for w in widths)  # every cycle after the first cut gives each group back its count
    assert sp.history[0]["kept_channels"] == sp.budget_report()["widths_history"][0]["kept_channels"]
    ends = [k for k in keeps if k is not None]
    assert any(not torch.equal(a, b) for x, y in zip(ends, ends[1:]) for a, b in zip(x, y))  # channels do move
    assert sp.predicted_cost() <= sp.budget * (1 + 1e-9)
    knapsack_model, knapsack_optimizer, knapsack = setup("iee", ramp_cycles=0, **CHANNEL_PAPER_CYCLE)
    train(knapsack_model, knapsack_optimizer, knapsack, 60)
    moved = [h["kept_channels"] for h in knapsack.history]
    assert any(w != moved[1] for w in moved[2:])  # the default re-solves the allocation: widths move
    with pytest.raises(ConfigError, match="regrow"):
        setup("iee", regrow="per-layer")


@pytest.mark.parametrize("ramp_cycles", [0, 2])
def test_iee_channel_max_cycles_stops_after_the_same_first_cuts_as_the_full_run(ramp_cycles):
    full_model, full_optimizer, full = setup("iee", seed=2, ramp_cycles=ramp_cycles)
    train(full_model, full_optimizer, full, 60)
    model, optimizer, sp = setup("iee", seed=2, max_cycles=2, ramp_cycles=ramp_cycles)
    masks = []
    train(model, optimizer, sp, 60, each=lambda step: masks.append(sp.masks()) if step > 2 * sp.cycle_length else None)
    assert sp.cycles == 2 and len(sp.history) == 2 < len(full.history)
    assert sp.history == full.history[:2]  # Ω_t on the full run's schedule: the same two cycles, cut for cut
    assert all(torch.equal(m[n], masks[0][n]) for m in masks for n in m)  # then the mask stays fixed
    _, _, shorter = setup("iee", seed=2, t_end=2 * sp.cycle_length)  # what t_end would do instead: a smaller cut
    assert shorter.update_fraction(sp.H) < sp.update_fraction(sp.H)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="max_cycles"):
            setup("iee", max_cycles=bad)


@pytest.mark.parametrize("method", ["iee", "halp"])
def test_min_width_keeps_a_floor_of_every_group_through_every_cut(method):
    model, optimizer, sp = setup(method, latency_target=0.45, min_width=0.5)
    fewest = [sp.allocator.fewest(i) for i in range(len(sp.groups))]
    assert fewest == [max(2, -(-g.size // 2 // 2) * 2) for g in sp.groups]  # half, in whole chunks of G = 2
    seen = []
    train(model, optimizer, sp, 60, each=lambda step: seen.append(sp.kept_counts()))
    assert len(sp.history) >= 5
    assert all(k >= f for counts in seen for k, f in zip(counts, fewest))
    assert sp.predicted_cost() <= sp.budget * (1 + 1e-9)
    plain_model, plain_optimizer, plain = setup(method, latency_target=0.45)
    train(plain_model, plain_optimizer, plain, 60)
    assert min(k / g.size for k, g in zip(plain.kept_counts(), plain.groups)) < 0.5  # the floor made a difference
    with pytest.raises(ConfigError, match="below what this model reaches with 0.9 of every group's channels"):
        setup(method, latency_target=0.45, min_width=0.9)
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ConfigError, match="min_width"):
            setup(method, min_width=bad)


class TokenModel(nn.Module):
    """Tokens through Linear layers, a sequence-first nn.MultiheadAttention (projections used functionally) and a
    pooler on one token: a Linear's cost scales with the tokens it runs on."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.pool, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):  # (batch, 5 tokens, 7)
        h = self.embed(x).transpose(0, 1)  # (tokens, batch, features)
        h = h + self.attn(h, h, h)[0]
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.tanh(self.pool(h[0])))


def test_the_macs_cost_model_prices_every_projection_as_it_runs_tokens_included():
    from regrow.channels.costs import MacsCost, fixed_widths
    from regrow.flops import layer_macs
    from regrow.latency_report import channel_widths

    model = TokenModel()
    shapes = layer_shapes(model, torch.zeros(1, 5, 7))
    widths = {**channel_widths(model), **fixed_widths(shapes)}
    assert shapes["attn.in_proj_weight"].fixed == (16, 48)  # self-attention: the packed q/k/v weight
    cost, macs = MacsCost(shapes), layer_macs(model, (5, 7))
    assert set(shapes) == set(macs)
    for name in shapes:  # 5 tokens through every projection but the pooler and the head, which see one
        assert cost(name, *widths[name]) * 1e6 == pytest.approx(macs[name]), name
    assert macs["fc1"] == 5 * 16 * 32 and macs["pool"] == 16 * 16


def test_halp_on_a_transformer_predicts_the_exported_models_macs_exactly():
    from regrow.export import export_masked_model
    from regrow.flops import layer_macs

    torch.manual_seed(0)
    model = TokenModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = regrow.create("halp", model, optimizer, structure="channel", latency_target=0.6, cost="macs",
                       input_shape=(5, 7), total_steps=12, prune_every=2, prune_steps=3, group_size=2)
    g = torch.Generator().manual_seed(0)
    train_on(model, optimizer, sp, ((torch.randn(8, 5, 7, generator=g), torch.randint(0, 3, (8,), generator=g))
                                    for _ in range(12)))
    predicted = sp.summary_fields()["channels"]["predicted_fraction"]
    assert predicted <= 0.6 + 1e-9
    exported, _ = export_masked_model(model.eval(), torch.zeros(1, 5, 7))
    dense = sum(layer_macs(TokenModel(), (5, 7)).values())
    assert sum(layer_macs(exported, (5, 7)).values()) / dense == pytest.approx(predicted)


class SharedBlock(nn.Module):
    """One block applied three times (weights shared across depth, as ALBERT does): it costs three runs."""

    def __init__(self, sizes=(16, 16, 16)):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.head = nn.Linear(8, 3)
        self.sizes = sizes

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for size in self.sizes:
            h = torch.relu(self.block(nn.functional.interpolate(h, size=size)))
        return self.head(h.mean((2, 3)))


def test_a_layer_run_several_times_is_priced_for_every_run_and_one_of_varying_size_is_refused():
    from regrow.channels.costs import MacsCost
    from regrow.flops import layer_macs
    from regrow.latency_report import channel_widths

    model = SharedBlock()
    shapes = layer_shapes(model, torch.zeros(1, 1, 16, 16))
    assert shapes["block.0"].calls == 3 and shapes["stem"].calls == 1
    cost, macs, widths = MacsCost(shapes), layer_macs(model, (1, 16, 16)), channel_widths(model)
    for name in shapes:
        assert cost(name, *widths[name]) * 1e6 == pytest.approx(macs[name]), name
    with pytest.raises(ConfigError, match="block.0 runs on inputs of different sizes"):
        layer_shapes(SharedBlock(sizes=(16, 8)), torch.zeros(1, 1, 16, 16))


def test_epilogues_record_the_batchnorm_and_activation_on_a_layers_output_and_time_them_with_it():
    from regrow.channels.costs import _layer_and_input

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a, self.act = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
            self.b, self.bn_b = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
            self.c = nn.Conv2d(8, 8, 1)  # its output goes to an add first: no epilogue
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.act(self.bn_a(self.a(x)))
            y = self.bn_b(self.b(x))
            z = self.relu(self.c(y) + y)
            return self.fc(z.mean((2, 3)))

    model = Block()
    bare = layer_shapes(model, torch.zeros(1, 1, 12, 12))
    shapes = layer_shapes(model, torch.zeros(1, 1, 12, 12), epilogues=True)
    assert {n: s.epilogue for n, s in shapes.items()} == {"a": ("BatchNorm", "ReLU6"), "b": ("BatchNorm",),
                                                         "c": (), "fc": ()}
    assert all(s.epilogue == () for s in bare.values())
    assert shapes["c"].key() == bare["c"].key() and shapes["a"].key() != bare["a"].key()  # cached cells stay valid
    cell, x = _layer_and_input(shapes["a"], 1, 5, batch_size=2)
    assert [type(m).__name__ for m in cell] == ["Conv2d", "BatchNorm2d", "ReLU6"] and cell(x).shape == (2, 5, 10, 10)
    assert isinstance(_layer_and_input(bare["a"], 1, 5, batch_size=2)[0], nn.Conv2d)


def test_channel_methods_budget_with_epilogue_cells_unless_told_otherwise(tmp_path):
    def shapes(**options):
        model = create_model("resnet8")
        sp = regrow.HALP(model, None, latency_target=0.9, cost="latency", latency_batch=2, cache_dir=tmp_path,
                         input_shape=(1, 28, 28), prune_first=True, **options)
        return sp.cost_model.shapes
    assert shapes()["layer1.0.conv1"].epilogue == ("BatchNorm", "ReLU")
    assert all(s.epilogue == () for s in shapes(latency_epilogues=False).values())
    with pytest.raises(ConfigError, match="latency_epilogues"):
        shapes(latency_epilogues="yes")


def test_a_run_resumes_only_with_the_latency_cells_it_was_priced_by(tmp_path):
    from regrow import checkpoint
    from regrow.errors import CheckpointError

    def halp(**options):
        return regrow.HALP(create_model("resnet8"), None, latency_target=0.9, cost="latency", latency_batch=2,
                           cache_dir=tmp_path, input_shape=(1, 28, 28), prune_first=True, **options)
    checkpoint.save(tmp_path / "sp.safetensors", {"sp": halp(latency_epilogues=False).state_dict()}, {})
    bare, _ = checkpoint.load(tmp_path / "sp.safetensors")
    halp(latency_epilogues=False).load_state_dict(bare["sp"])
    with pytest.raises(CheckpointError, match="latency_epilogues=false"):
        halp().load_state_dict(bare["sp"])
    before_the_option = {k: v for k, v in bare["sp"].items() if k != "latency_epilogues"}  # priced by bare layers
    with pytest.raises(CheckpointError, match="latency_epilogues=false"):
        halp().load_state_dict(before_the_option)
    halp().load_state_dict(halp().state_dict())
