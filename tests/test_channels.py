import pytest
import torch
from torch import nn

from regrow.channels import IN, OUT, channel_groups
from regrow.errors import ConfigError
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
