"""A `torch.distributed.checkpoint` reader that runs no code from the checkpoint.

DCP loads tensors with `torch.load(weights_only=True)` but unpickles its `.metadata` file with
plain `pickle`, so a crafted checkpoint could run code when opened. torch's own weights-only
unpickler cannot read that file (it refuses pickle protocol 4's framing), so this reader
unpickles it with an allowlist instead: DCP's metadata dataclasses, torch's `Size`, dtypes,
layouts and memory formats, and paths. Anything else is refused by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem, metadata

__all__ = ["SafeReader"]

_MODULES = {metadata.__name__: metadata}
_NAMES = {
    (filesystem.__name__, "_StorageInfo"),
    ("torch", "Size"),
    ("torch._utils", "_get_layout"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _MODULES and isinstance(getattr(_MODULES[module], name, None), type):
            return super().find_class(module, name)
        if (module, name) in _NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which is not checkpoint metadata; "
            "refusing to load it (it could run code)"
        )


class SafeReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata is read with the allowlist above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> metadata.Metadata:
        path = Path(self.path) / ".metadata"
        if kwargs.get("rank") is not None:
            path = Path(self.path) / f"__{kwargs['rank']}.metadata"
        with open(path, "rb") as file:
            found = _Unpickler(file).load()
        if not isinstance(found, metadata.Metadata):
            raise pickle.UnpicklingError(f"{path}: not DCP checkpoint metadata")
        storage = getattr(found, "storage_meta", None) or metadata.StorageMeta()
        storage.load_id = self.load_id
        found.storage_meta = storage
        return found
