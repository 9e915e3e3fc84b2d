"""Physical channel removal: a channel-masked model becomes a smaller plain ``nn.Module`` (Torch-Pruning surgery).

The recorded structure of an exported model is the list of kept channels per group root, so loading needs only
the original architecture (a registry name, or the user's own constructor): build it, remove the same channels,
load the weights. ONNX export goes through ``torch.onnx`` (torch.export's exporter; the TorchScript one as a
fallback) and is checked against onnxruntime when asked.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import checkpoint, masking
from .artifacts import build_model
from .channels.groups import OUT, ChannelMasks, _tracer
from .channels.heads import adapter_for
from .errors import CheckpointError, ConfigError, ExportError

EXPORT_FORMAT = "regrow-export/1"


class OutputCheck:
    """The model's outputs on a fixed random batch, to check after each group's removal that nothing changed.

    Removing channels whose masks are baked to zero must leave the function as it was, up to rounding (fewer terms
    in each sum). A group that Torch-Pruning cannot remove exactly (a grouped conv inside a residual block, a layer
    it does not know) changes the outputs: then :class:`ExportError` names the group and nothing is saved."""

    def __init__(self, model: nn.Module, example: tuple[int, ...] | torch.Tensor, samples: int = 8,
                 tolerance: float = 1e-4):
        # ``example``: one sample's shape (float inputs), or example inputs whose kind is kept: token ids are
        # checked on random ids up to the example's largest
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        if isinstance(example, torch.Tensor) and not example.is_floating_point():
            self.inputs = torch.randint(0, int(example.max()) + 1, (samples, *example.shape[1:]), generator=generator)
        else:
            shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else tuple(example)
            self.inputs = torch.randn(samples, *shape, generator=generator)
        self.inputs = self.inputs.to(device)
        self.model, self.tolerance = model, tolerance
        self.reference = self._outputs()
        self.scale = 1.0 + float(self.reference.abs().max())

    def _outputs(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(self.inputs)
        self.model.train(was_training)
        return out

    def __call__(self, root: str) -> None:
        try:
            out = self._outputs()
        except Exception as e:  # the surgery left layers that no longer fit together
            raise ExportError(f"after removing the channels of group {root!r} the model no longer runs "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); refusing to export") from None
        if out.shape != self.reference.shape:
            raise ExportError(f"removing the channels of group {root!r} changed the output shape "
                              f"{tuple(self.reference.shape)} -> {tuple(out.shape)}; refusing to export")
        diff = float((out - self.reference).abs().max())
        if not diff <= self.tolerance * self.scale:
            raise ExportError(f"removing the channels of group {root!r} changed the model's outputs by up to "
                              f"{diff:.3g} (tolerance {self.tolerance * self.scale:.2g}): this group cannot be "
                              "removed exactly (a grouped conv inside a residual block does this); refusing to export")


def remove_channels(model: nn.Module, example_inputs: torch.Tensor, kept: dict[str, list[int]],
                    check: OutputCheck | None = None) -> nn.Module:
    """Remove, in place, every channel of each group (named by its root layer) that is not in ``kept[root]``;
    ``check`` (when given) runs after each group."""
    tp = _tracer()
    modules = dict(model.named_modules())
    unknown = [root for root in kept if root not in modules]
    if unknown:
        raise ConfigError(f"no layer named {', '.join(map(repr, unknown))} in the model to remove channels from")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the tracer follows autograd: under torch.no_grad() there would be no graph
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as e:
        raise ConfigError(f"the dependency graph cannot trace this model ({type(e).__name__}: {e})") from None
    for root, keep in kept.items():
        module = modules[root]
        adapter = adapter_for(module)
        if adapter is not None:  # a group of whole attention heads, named after its attention module
            _remove_heads(root, module, adapter, keep, modules, tp)
            if check is not None:
                check(root)
            continue
        if isinstance(module, nn.Linear):
            size, prune = module.out_features, tp.prune_linear_out_channels
        else:
            size, prune = module.out_channels, tp.prune_conv_out_channels
        if not keep:
            raise ConfigError(f"group {root!r} would lose every channel; at least one must stay")
        drop = sorted(set(range(size)) - {int(i) for i in keep})
        if drop:
            try:
                graph.get_pruning_group(module, prune, idxs=drop).prune()
            except Exception as e:
                raise ExportError(f"Torch-Pruning could not remove the channels of group {root!r} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if check is not None:
                check(root)
    model.train(was_training)
    return model


def _remove_heads(root: str, module: nn.Module, adapter, keep: list[int], modules: dict[str, nn.Module], tp) -> None:
    """Remove the heads of ``module`` not in ``keep``: their rows in every projection, their columns in the output
    layer (Torch-Pruning's layer functions), then the module's head count (the adapter)."""
    layout = adapter.layout(root, module)
    if isinstance(layout, str):
        raise ExportError(f"cannot remove the heads of {root!r}: {layout}")
    if not keep:
        raise ConfigError(f"attention {root!r} would lose every head; at least one must stay")
    drop = sorted(set(range(layout.num_heads)) - {int(i) for i in keep})
    if not drop:
        return
    hd = layout.head_dim
    for layer, offsets in layout.projections:
        tp.prune_linear_out_channels(modules[layer], [o + h * hd + j for h in drop for o in offsets for j in range(hd)])
    tp.prune_linear_in_channels(modules[layout.output], [h * hd + j for h in drop for j in range(hd)])
    adapter.set_heads(module, layout.num_heads - len(drop))


def export_channels(model: nn.Module, masks: ChannelMasks, example_inputs: torch.Tensor) -> tuple[nn.Module, dict]:
    """Bake the masks, remove them and the masked channels; return the plain model and its recorded structure.

    The model is changed in place (it *becomes* the exported one); copy it first to keep the masked version.
    """
    kept = masks.kept_indices()
    for module in masking.masked_layers(model).values():
        masking.remove_mask(module, bake=True)
    remove_channels(model, example_inputs, kept, OutputCheck(model, example_inputs.cpu()))
    return model, _structure(kept, example_inputs)


def export_masked_model(model: nn.Module, example_inputs: torch.Tensor) -> tuple[nn.Module, dict]:
    """Export a model loaded with its masks (e.g. a run's ``model.safetensors``), without the sparsifier.

    The masks are baked in; then a group's channel (or head) is removed when every layer that produces it produces
    zeros there: its weight rows, biases and, for a norm, scale and shift all zero. Such a channel carries nothing, so
    removing it is exact (a channel with a zero weight row but a live bias or a BatchNorm shift still carries a
    constant, and stays). Zeros inside channels that stay remain as zeros. Changes ``model`` in place.
    """
    from .channels.groups import channel_groups  # local: avoid a cycle at import time

    for module in masking.masked_layers(model).values():
        masking.remove_mask(module, bake=True)
    modules = dict(model.named_modules())
    kept = {}
    for g in channel_groups(model, example_inputs):
        if g.excluded:
            continue
        alive = torch.zeros(g.size, dtype=torch.bool)
        for name, role, idxs in g.members:
            if role == OUT:  # a channel lives if any producer has a non-zero in its rows (for a head: all its rows)
                alive |= _rows_nonzero(modules[name])[idxs].reshape(g.size, -1).any(1)
        if not alive.all():
            kept[g.root] = torch.nonzero(alive).flatten().tolist()
    remove_channels(model, example_inputs, kept, OutputCheck(model, example_inputs.cpu()))
    return model, _structure(kept, example_inputs)


def _rows_nonzero(module: nn.Module) -> torch.Tensor:
    """Per output row: does the layer put anything there (a non-zero weight in the row, or a non-zero bias)?"""
    with torch.no_grad():
        weight = module.weight
        if weight is None:  # a norm without scale and shift: its output is a constant wherever the input is zero
            return torch.ones(module.num_features, dtype=torch.bool)
        alive = weight.flatten(1).ne(0).any(1) if weight.dim() > 1 else weight.ne(0)
        if getattr(module, "bias", None) is not None:
            alive = alive | module.bias.ne(0)
    return alive.cpu()


def _structure(kept: dict[str, list[int]], example_inputs: torch.Tensor) -> dict[str, Any]:
    structure = {"kept": kept, "input_shape": list(example_inputs.shape[1:])}
    if not example_inputs.is_floating_point():
        structure["input_dtype"] = "int64"
    return structure


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_exported(path: str | os.PathLike, model: nn.Module, structure: dict[str, Any],
                  metadata: dict[str, Any] | None = None) -> None:
    """Save an exported model: its state dict (safetensors) and the structure needed to rebuild it."""
    if masking.masked_layers(model):
        raise ConfigError("save_exported takes a plain (exported) model; this one still has masks")
    meta = dict(metadata or {}, format=EXPORT_FORMAT, structure=structure)
    checkpoint.save(path, {"model": model.state_dict()}, meta)


def load_exported(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model: ``model`` is a fresh instance of its original architecture, or ``None`` to build
    it from the registry entry recorded at export time."""
    sections, meta = checkpoint.load(path)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is a regrow checkpoint but not an exported model (use `regrow export`)")
    if model is None:
        model = build_model(meta)
    example = torch.zeros(1, *meta["structure"]["input_shape"],
                          dtype=torch.long if meta["structure"].get("input_dtype") == "int64" else torch.float)
    try:
        remove_channels(model, example, meta["structure"]["kept"])
    except (ConfigError, ExportError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this architecture: {e}") from None
    state = sections["model"]
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or len(state) != len(expected):
        raise CheckpointError(f"{path} does not fit this architecture (first mismatch: "
                              f"{bad[0] if bad else sorted(set(state) - set(expected))[0]})")
    model.load_state_dict(state)
    return model, meta


ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the exporter that wrote it, and the largest absolute difference between
    onnxruntime's and PyTorch's outputs on the check batch (``None`` without a check)."""

    exporter: str
    max_abs_diff: float | None
    fallback_reason: str | None = None  # why "auto" fell back to the TorchScript exporter


def _export_dynamo(model: nn.Module, example_inputs: torch.Tensor, tmp: str) -> None:
    # torch.export's exporter, the one torch recommends (the TorchScript exporter is deprecated in torch 2.13); a
    # dynamic batch dimension that also accepts the size of the example, 1 included.
    # Its registry logs a warning for every torchvision operator it cannot register when torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # onnxscript's use of a deprecated pytree check
        torch.onnx.export(model, (example_inputs,), tmp, input_names=["input"], output_names=["output"],
                          dynamo=True, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)


def _export_torchscript(model: nn.Module, example_inputs: torch.Tensor, tmp: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example_inputs,), tmp, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike,
                check: bool = True, atol: float = 1e-4, exporter: str = "auto") -> OnnxExport:
    """Write ``model`` as ONNX (batch dimension dynamic). With ``check``, run it under onnxruntime on
    ``example_inputs`` and record the largest absolute difference to PyTorch (an error above ``atol``, and
    nothing is saved).

    ``exporter``: ``dynamo`` (torch.export's, which torch recommends), ``torchscript`` (the deprecated one), or
    ``auto`` (default): dynamo, and the TorchScript exporter only if dynamo cannot export the model (the reason is
    kept in the result and warned)."""
    if exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; known: {', '.join(ONNX_EXPORTERS)}")
    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package (pip install onnx onnxscript)") from e
    model = model.eval()

    if check:
        try:
            import onnxruntime
        except ImportError as e:
            raise ConfigError("checking an ONNX export needs onnxruntime (pip install onnxruntime)") from e
    result = OnnxExport(exporter="torchscript" if exporter == "torchscript" else "dynamo", max_abs_diff=None)

    def write(tmp):
        if result.exporter == "dynamo":
            try:
                _export_dynamo(model, example_inputs, tmp)
            except Exception as e:  # noqa: BLE001 - any failure of the new exporter: the old one may still work
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if exporter == "dynamo":
                    raise ExportError(f"torch.export's ONNX exporter failed ({reason}); nothing was saved") from e
                result.exporter, result.fallback_reason = "torchscript", reason
                warnings.warn(f"torch.export's ONNX exporter failed ({result.fallback_reason}); exported with the "
                              "TorchScript exporter instead", stacklevel=3)
        if result.exporter == "torchscript":
            _export_torchscript(model, example_inputs, tmp)
        if check:  # checked before it takes the destination's name: a file that fails is never left there
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(None, {"input": example_inputs.numpy()})[0]
            with torch.no_grad():
                want = model(example_inputs).numpy()
            diff = float(abs(got - want).max())
            if not diff <= atol:
                raise ExportError(f"ONNX output ({result.exporter} exporter) differs from PyTorch by {diff:.3g} "
                                  f"(> {atol:g}); nothing was saved")
            result.max_abs_diff = diff

    checkpoint.atomic_write(path, write)
    return result
