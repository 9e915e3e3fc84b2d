"""Models from the zoos users already use, as regrow model factories (``--model regrow.zoo:torchvision_resnet18``).

Optional: ``pip install regrow[zoo]`` (torchvision, timm, transformers). Each factory takes regrow's
``in_channels``, ``num_classes`` and ``input_size``, so a run folder records it and rebuilds it like a registry
model. Nothing downloads weights: the models start from their random initialisation (train them, or load your
own weights into them).

torchvision on a CPU-only torch: the PyPI torchvision wheels that fit torch 2.13 are CUDA builds whose compiled
operators fail to load on the CPU build, and ``import torchvision`` then stops at ``operator torchvision::nms does
not exist``. :func:`import_torchvision` declares the two operators its Python code registers against (``nms``,
``qnms``; no implementation: detection models that call them fail) and imports it again: the classification
models and ``transforms.v2`` work.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch
from torch import nn

from .errors import ConfigError

_SHIM: list[torch.library.Library] = []  # the declaring library must stay alive


def import_torchvision() -> ModuleType:
    """``torchvision``, importable on a CPU-only torch even from a CUDA wheel (see the module docstring)."""
    try:
        return importlib.import_module("torchvision")
    except ImportError as e:
        raise ConfigError("this needs torchvision: pip install 'regrow[zoo]'") from e
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    if not _SHIM:
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.append(library)
    return importlib.import_module("torchvision")


def torchvision_ready() -> None:
    """Make an installed torchvision importable before a library that imports it when present (timm, transformers,
    Lightning) does: without this, a CUDA torchvision wheel on the CPU torch breaks *their* imports too. Nothing
    happens when torchvision is absent or imports by itself."""
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()


def _import(name: str, extra: str = "zoo") -> ModuleType:
    try:
        torchvision_ready()
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"this model needs {name}: pip install 'regrow[{extra}]'") from e


def _input_stem(model: nn.Module, attribute: str, in_channels: int) -> None:
    """Swap a stem conv for one with ``in_channels`` inputs (same kernel, stride, padding, width)."""
    conv = getattr(model, attribute)
    setattr(model, attribute, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        bias=conv.bias is not None))


def torchvision_resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet stem), ``in_channels`` inputs, ``num_classes`` outputs."""
    model = import_torchvision().models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        _input_stem(model, "conv1", in_channels)
    return model


def timm_vit_tiny(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> nn.Module:
    """timm's ViT-Tiny (192 wide, 12 blocks, 3 heads) with patches of ``input_size`` / 8 pixels."""
    timm = _import("timm")
    patch = max(1, input_size // 8)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=input_size,
                             patch_size=patch, in_chans=in_channels)


def timm_convnext_atto(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> nn.Module:
    """timm's ConvNeXt-Atto (depthwise 7×7 convs, LayerNorm, inverted bottlenecks)."""
    return _import("timm").create_model("convnext_atto", pretrained=False, num_classes=num_classes,
                                        in_chans=in_channels)


class HuggingFaceClassifier(nn.Module):
    """A Hugging Face sequence classifier that takes token ids and returns logits (padding id 0 is masked out), so
    that regrow's trainer, its evaluation and its exports can call it like any model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=(ids != 0).long()).logits


def hf_bert_tiny(in_channels: int = 1, num_classes: int = 2, input_size: int = 16, vocab_size: int = 1000
                 ) -> nn.Module:
    """A 2-layer BERT (hidden 64, 2 heads) for sequence classification, built from a config (no download); its
    inputs are token ids of sequences up to ``input_size`` long."""
    transformers = _import("transformers", "huggingface")
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=max(input_size, 16), num_labels=num_classes)
    return HuggingFaceClassifier(transformers.BertForSequenceClassification(config))
