"""Checkpoints: one safetensors file whose header carries JSON metadata, written atomically.

Nested states (model, optimizer, sparsifier, trainer) are flattened: tensors go into the safetensors body under
``section/path`` keys, everything else into a JSON skeleton in the header. Nothing is ever unpickled, and a file
is first written beside its destination and then renamed over it, so a crash or an error never leaves a
half-written or broken checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

FORMAT = "regrow-checkpoint/1"
_TENSOR, _ITEMS = "__tensor__", "__items__"


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {_ITEMS: [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {key} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_ITEMS}:
            return {k: _unflatten(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file should get what open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, write)


def save(path: str | os.PathLike, sections: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
    """Save nested ``sections`` (e.g. ``{"model": state_dict, "optimizer": ...}``) with JSON ``metadata``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _flatten(value, name, tensors) for name, value in sections.items()}
    header = {"format": FORMAT, "metadata": metadata or {}, "skeleton": skeleton}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"regrow": json.dumps(header)}))


def _open(path: str | os.PathLike, with_tensors) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's raw metadata, and its tensors if ``with_tensors(metadata)`` says so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors(metadata) else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    return metadata, tensors


def _read(path: str | os.PathLike, with_tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    metadata, tensors = _open(path, lambda _: with_tensors)
    try:
        header = json.loads(metadata.get("regrow", "null"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a regrow checkpoint")
    return header, tensors


def load_plain(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a plain safetensors file (a state dict saved with ``safetensors.torch.save_file``); None if
    it is a regrow checkpoint (its tensors are then not read)."""
    metadata, tensors = _open(path, lambda meta: "regrow" not in meta)
    return None if "regrow" in metadata else tensors


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(sections, metadata)`` of a checkpoint written by :func:`save`."""
    header, tensors = _read(path, with_tensors=True)
    return _unflatten(header["skeleton"], tensors), header["metadata"]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Only the metadata (no tensors are read)."""
    return _read(path, with_tensors=False)[0]["metadata"]
