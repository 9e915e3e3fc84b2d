"""Models written for regrow (no torchvision): CIFAR-style ResNets, WideResNet, a small VGG, MobileNetV2, an MLP.

All take ``in_channels`` (1 for Fashion-MNIST, 3 for colour) and ``num_classes``, and work on inputs of 28×28
and up. ResNet downsampling shortcuts are 1×1 conv + BatchNorm (He et al.'s option B) rather than option A's
zero padding: the same accuracy on small data, and channel pruning can follow the coupling through a plain conv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError, unknown
from .plugins import call_factory, is_import_spec, load_object


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three stages of n basic blocks, widths 16·w, 32·w, 64·w."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n + 2")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class WideBlock(nn.Module):
    """Pre-activation basic block of a WideResNet (BN-ReLU-conv3×3 twice); 1×1 conv shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-d-k (Zagoruyko & Komodakis 2016): three stages of (d − 4) / 6 pre-activation blocks of widths
    16k, 32k, 64k; WRN-22-2 is the CIFAR model of the RigL and IEE papers."""

    def __init__(self, depth: int = 22, widen: int = 2, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn, self.relu = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(x))), 1))


class VGG(nn.Module):
    """A small VGG (8 convs with BatchNorm, four 2×2 pools, global pooling, one classifier)."""

    CONFIG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, config=CONFIG):
        super().__init__()
        layers, c_in = [], in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*_conv_bn(c_in, item), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *_conv_bn(hidden, c_out, 1)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images (stride-1 stem, two fewer downsamplings), with a width multiplier.

    ``stem_stride=2`` halves the resolution at the stem as the ImageNet model does: on 28×28 inputs a quarter of
    the stride-1 model's MACs; ``mobilenetv2-small`` (that and width 0.5) trains about as fast as ResNet-20 on a
    CPU core, where the full model is over ten times slower (its 28×28 expansions dominate).
    """

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0, stem_stride: int = 1):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(round(c * width_mult / 8)) * 8)

        c_in = w(32)
        layers: list[nn.Module] = [*_conv_bn(in_channels, c_in, 3, stem_stride), nn.ReLU6(inplace=True)]
        for expand, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, w(c), s if i == 0 else 1, expand))
                c_in = w(c)
        last = max(1280, w(1280)) if width_mult > 1.0 else 1280
        layers += [*_conv_bn(c_in, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """LeNet-300-100 style multilayer perceptron on flattened inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 hidden: tuple[int, ...] = (300, 100)):
        super().__init__()
        dims = [in_channels * input_size * input_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": lambda **kw: CifarResNet(8, **kw),
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet32": lambda **kw: CifarResNet(32, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "wrn22-2": lambda **kw: WideResNet(22, 2, **kw),
    "vgg": lambda **kw: VGG(**kw),
    "mobilenetv2": lambda **kw: MobileNetV2(**kw),
    "mobilenetv2-small": lambda **kw: MobileNetV2(width_mult=0.5, stem_stride=2, **kw),
    "mlp": lambda input_size=28, **kw: MLP(input_size=input_size, **kw),
}


def create_model(name: str, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Module:
    """Build a registry model, or a user's (``package.module:factory``); an unknown name lists the known ones.

    A user's factory is called with those of ``in_channels``, ``num_classes`` and ``input_size`` it declares and
    must return an ``nn.Module``."""
    if is_import_spec(name):
        model = call_factory(load_object(name, "model"), name, "model", in_channels=in_channels,
                             num_classes=num_classes, input_size=input_size)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    if name not in MODELS:
        raise unknown("model", name, list(MODELS) + ["package.module:factory"])
    kwargs = {"in_channels": in_channels, "num_classes": num_classes}
    if name == "mlp":
        kwargs["input_size"] = input_size
    return MODELS[name](**kwargs)
