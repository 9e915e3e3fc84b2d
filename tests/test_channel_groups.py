import pytest
import torch
from torch import nn

from regrow import masking
from regrow.channels.groups import IN, OUT, ChannelMasks, channel_groups
from regrow.errors import CheckpointError, ConfigError, ExportError
from regrow.export import (
    OutputCheck,
    count_parameters,
    export_channels,
    export_onnx,
    load_exported,
    remove_channels,
    save_exported,
)
from regrow.models import MODELS, create_model


def group_of(groups, module, role=OUT):
    found = [g for g in groups if any(n == module and r == role for n, r, _ in g.members)]
    assert len(found) == 1, f"{module} {role} in {len(found)} groups"
    return found[0]


def test_resnet_residual_stages_share_one_group():
    model = create_model("resnet20")
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    assert len(groups) == 3 + 9  # one per residual stage, one inside each basic block
    stage1 = group_of(groups, "conv1")
    assert stage1.size == 16
    for block in range(3):  # every block's second BN adds into the stage's channels
        assert group_of(groups, f"layer1.{block}.bn2") is stage1
        assert (f"layer1.{block}.conv1", IN) in [(n, r) for n, r, _ in stage1.members]
    inner = group_of(groups, "layer1.0.conv1")
    assert inner is not stage1 and inner.modules() == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    assert group_of(groups, "layer2.0.shortcut.0") is group_of(groups, "layer2.2.bn2")


def test_depthwise_conv_is_coupled_with_the_conv_that_feeds_it():
    model = create_model("mobilenetv2")
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    block = model.features[4].block  # expand 1×1, BN, ReLU6, depthwise 3×3, BN, ReLU6, project 1×1, BN
    assert block[3].groups == block[3].in_channels
    expand = group_of(groups, "features.4.block.0")
    assert "features.4.block.3" in expand.modules(OUT)  # depthwise output channel i == its input channel i


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_prunable_output_channel_is_in_exactly_one_group(name):
    model = create_model(name)
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    for layer, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and layer != last_linear:
            group = group_of(groups, layer)
            index = [i for n, r, i in group.members if n == layer and r == OUT][0]
            assert len(index) == group.size


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_concatenation_consumers_see_offset_channels():
    groups = channel_groups(Concat(), torch.randn(1, 1, 8, 8))
    b = group_of(groups, "b")
    assert ("c", IN, [4, 5, 6, 7, 8, 9]) in b.members
    assert ("c", IN, [0, 1, 2, 3]) in group_of(groups, "a").members
    assert all(n != "fc" or r == IN for g in groups for n, r, _ in g.members)  # the classes are never pruned


def test_untraceable_model_or_unknown_layer_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot trace"):
        channel_groups(create_model("resnet20"), torch.randn(1, 3, 28, 28))  # 3 channels into a 1-channel stem
    with pytest.raises(ConfigError, match="no layer named 'stem'"):
        channel_groups(create_model("resnet20"), torch.randn(1, 1, 28, 28), ignored=["stem"])


class ConcatNet(nn.Module):
    """A user model: two branches concatenated, BatchNorm after the concat, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def random_channel_masks(model, x, seed=1):
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *x.shape[1:]))  # BatchNorm statistics that are not the identity
    masks = ChannelMasks(model, channel_groups(model, x[:1]))
    g = torch.Generator().manual_seed(seed)
    for i, group in enumerate(masks.groups):
        keep = torch.rand(group.size, generator=g) > 0.5
        keep[torch.randint(group.size, (1,), generator=g)] = True
        masks.set_keep(i, keep)
    return masks


def test_a_residual_stage_shares_one_mask_and_its_channels_are_zero_everywhere():
    model = create_model("resnet20")
    x = torch.randn(2, 1, 28, 28)
    masks = ChannelMasks(model, channel_groups(model, x[:1]))
    stage = [i for i, g in enumerate(masks.groups) if g.root == "conv1"][0]
    keep = torch.ones(16, dtype=torch.bool)
    keep[[2, 7, 11]] = False
    masks.set_keep(stage, keep)
    for name in ["conv1", "layer1.0.conv2", "layer1.2.conv2"]:  # every producer into the stage's stream
        assert torch.equal(masking.mask_of(masks.modules[name]).flatten(1).any(1), keep)
    for name in ["bn1", "layer1.0.bn2", "layer1.1.bn2"]:
        assert torch.equal(masking.mask_of(masks.modules[name], "bias"), keep)
    assert torch.equal(masking.mask_of(masks.modules["layer1.1.conv1"]).transpose(0, 1).flatten(1).any(1), keep)
    seen = []
    hooks = [model.layer1[b].register_forward_hook(lambda m, i, o: seen.append(o)) for b in range(3)]
    for mode in (True, False):
        model.train(mode)
        model(x)
    for h in hooks:
        h.remove()
    assert all(out[:, ~keep].abs().max() == 0 and out[:, keep].abs().max() > 0 for out in seen)
    assert masks.kept_indices()["conv1"] == [i for i in range(16) if keep[i]]


@pytest.mark.parametrize("name", sorted(MODELS) + ["user-concat"])
def test_export_removes_masked_channels_and_gives_the_masked_models_outputs(name):
    model = ConcatNet() if name == "user-concat" else create_model(name)
    x = torch.randn(4, 1, 28, 28)
    masks = random_channel_masks(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    params_before = count_parameters(model)
    exported, structure = export_channels(model, masks, x[:1])
    assert not masking.masked_layers(exported)
    assert count_parameters(exported) < params_before
    for group_root, kept in structure["kept"].items():
        module = dict(exported.named_modules())[group_root]
        assert (module.out_features if isinstance(module, nn.Linear) else module.out_channels) == len(kept)
    with torch.no_grad():
        assert torch.allclose(exported(x), expected, atol=1e-5)


def test_exported_model_saves_loads_and_runs_under_onnxruntime(tmp_path):
    model = create_model("resnet8")
    x = torch.randn(3, 1, 28, 28)
    masks = random_channel_masks(model, x, seed=3)
    exported, structure = export_channels(model, masks, x[:1])
    exported.eval()
    meta = {"model": "resnet8", "in_channels": 1, "num_classes": 10, "input_size": 28}
    save_exported(tmp_path / "model.safetensors", exported, structure, meta)
    loaded, loaded_meta = load_exported(tmp_path / "model.safetensors")
    assert not masking.masked_layers(loaded) and type(loaded) is type(exported)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), exported(x))
    assert loaded_meta["structure"]["kept"] == structure["kept"]
    with pytest.raises(CheckpointError, match="does not fit"):
        load_exported(tmp_path / "model.safetensors", model=create_model("resnet20"))
    written = export_onnx(exported, x, tmp_path / "model.onnx")
    assert written.exporter == "dynamo" and written.fallback_reason is None  # torch.export's exporter, no fallback
    assert written.max_abs_diff < 1e-4 and (tmp_path / "model.onnx").stat().st_size > 0


class GroupedResidual(nn.Module):
    """A grouped (not depthwise) conv inside a residual block: its input channels follow the residual stream."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.grouped, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def block(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.grouped(x)))
        return torch.relu(x + self.bn3(self.conv3(y)))

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_an_export_that_would_change_the_function_is_refused(seed):
    model = GroupedResidual()
    x = torch.randn(4, 1, 28, 28)
    masks = random_channel_masks(model, x, seed=seed)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    try:
        exported, _ = export_channels(model, masks, x[:1])
    except ExportError as e:
        assert "group 'conv3'" in str(e) and "refusing to export" in str(e) or "could not remove" in str(e)
        return
    with torch.no_grad():
        assert torch.allclose(exported(x), expected, atol=1e-4)  # exported, then exactly


def test_the_output_check_catches_a_wrong_removal():
    model = create_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    check = OutputCheck(model, (1, 28, 28))
    check("none yet")  # unchanged: passes
    with pytest.raises(ExportError, match="group 'layer1.0.conv1' changed the model's outputs"):
        # channels 0-3 are alive (nothing was masked): removing them changes the function
        remove_channels(model, x[:1], {"layer1.0.conv1": list(range(4, 16))}, check)


class WithLayerNorm(nn.Module):
    """A conv whose channels feed a LayerNorm over (C, H, W): that group cannot carry channel masks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 28, 28])
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.norm(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class GroupedResidualThenConv(GroupedResidual):
    """The grouped residual block, then a plain conv block whose channels can be pruned."""

    def __init__(self):
        super().__init__()
        self.conv4, self.bn4 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn4(self.conv4(self.block(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model_class, why", [(GroupedResidualThenConv, "a grouped conv (2 groups)"),
                                              (WithLayerNorm, "a LayerNorm")])
def test_groups_that_cannot_be_pruned_exactly_are_left_whole_and_the_rest_is_pruned(model_class, why):
    import regrow

    torch.manual_seed(0)
    model = model_class()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="left whole"):
        sp = regrow.create("halp", model, optimizer, structure="channel", cost="macs", latency_target=0.8,
                           prune_first=True, input_shape=(1, 28, 28), prune_every=1, prune_steps=2, total_steps=4)
    whole = [root for root, reason in sp.skipped.items() if why in reason]
    assert whole and sp.groups and not set(whole) & {g.root for g in sp.groups}
    x = torch.randn(8, 1, 28, 28)
    for _ in range(4):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sp.step()
    assert sp.predicted_cost() <= sp.budget + 1e-9
    model.eval()
    with torch.no_grad():
        expected = model(x)
    exported, structure = export_channels(model, sp.channels, x[:1])
    assert not set(whole) & set(structure["kept"])
    with torch.no_grad():
        assert torch.allclose(exported(x), expected, atol=1e-4)


def test_groups_can_be_left_whole_by_name_and_the_input_shape_is_required():
    import regrow

    with pytest.raises(ConfigError, match="pass input_shape"):
        regrow.create("halp", create_model("resnet8"), None, structure="channel", cost="macs")
    with pytest.raises(ConfigError, match="no channel group with root 'nope'"):
        regrow.create("halp", create_model("resnet8"), None, structure="channel", cost="macs",
                      input_shape=(1, 28, 28), exclude_groups="nope")
    sp = regrow.create("halp", create_model("resnet8"), None, structure="channel", cost="macs", prune_first=True,
                       input_shape=(1, 28, 28), exclude_groups="layer1.0.conv1,layer2.0.conv1")
    assert {"layer1.0.conv1", "layer2.0.conv1"} <= set(sp.skipped)
    assert not {"layer1.0.conv1", "layer2.0.conv1"} & {g.root for g in sp.groups}


def test_export_works_under_no_grad():
    model = create_model("resnet8")
    x = torch.randn(2, 1, 28, 28)
    masks = random_channel_masks(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        exported, _ = export_channels(model, masks, x[:1])
        assert torch.allclose(exported(x), expected, atol=1e-4)


class DataDependent(nn.Module):
    """A branch on a value: torch.export cannot export it (a data-dependent guard), TorchScript traces one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > -1e9:  # always true on the check batch
            return self.fc(x)
        return -self.fc(x)


def test_onnx_falls_back_to_torchscript_only_when_dynamo_cannot_export(tmp_path):
    import warnings

    torch.manual_seed(0)
    model, x = DataDependent(), torch.randn(3, 4)
    with pytest.raises(ExportError, match="torch.export's ONNX exporter failed"):
        export_onnx(model, x, tmp_path / "strict.onnx", exporter="dynamo")
    assert not (tmp_path / "strict.onnx").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = export_onnx(model, x, tmp_path / "auto.onnx")
    assert written.exporter == "torchscript" and written.fallback_reason
    assert any("TorchScript exporter instead" in str(w.message) for w in caught)
    assert written.max_abs_diff < 1e-5 and (tmp_path / "auto.onnx").stat().st_size > 0
    with pytest.raises(ConfigError, match="unknown ONNX exporter"):
        export_onnx(model, x, tmp_path / "x.onnx", exporter="onnx")


def test_export_from_masks_removes_only_channels_that_carry_nothing():
    """A weight row masked to zero whose bias still lives carries a constant: it stays (removing it would change the
    function, and the whole export would be refused); a row whose bias is zero too is removed. Exact either way."""
    from regrow.export import export_masked_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masking.add_mask(model[0])
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[[2, 5]] = False
    masking.set_mask(model[0], mask)
    with torch.no_grad():
        model[0].bias[5] = 0.0
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = model(x)
    exported, structure = export_masked_model(model, x[:1])
    assert structure["kept"]["0"] == [0, 1, 2, 3, 4, 6, 7]  # row 2 keeps its bias, row 5 had nothing left
    assert exported[0].out_features == 7 and exported[2].in_features == 7
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want)
