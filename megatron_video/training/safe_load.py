"""Reading checkpoint files a user may have been handed without running code from them.

Three kinds of pickles live in a training checkpoint folder, and each is checked here before
anything reads it for real (composition: torch and megatron are used unchanged):

- ``.metadata`` (torch dist-checkpoint, read by torch with plain ``pickle.load``): read with
  `load_dcp_metadata`, an unpickler that admits only the classes torch writes there;
- ``common.pt`` (read by megatron with ``torch.load``, weights-only by default) and the byte items inside ``*.distcp`` files (megatron's ShardedObjects, read by
  torch's planner with ``torch.load(weights_only=False)``): each must load under
  ``torch.load(weights_only=True)`` first (`check_dist_checkpoint`);
- our own old ``train_state`` (pickled bytes inside ``common.pt``): `loads_plain` admits plain
  builtins only.

Anything else is refused with `UnsafeCheckpointError`, naming the file and the global it asked for.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

DCP_METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
MEGATRON_CONFIG_FILE = "metadata.json"

_PLAIN_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "complex"}
)

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.planner": frozenset(
        {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType"}
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or load objects we do not admit) when unpickled."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals `allowed(module, name)` accepts."""

    def __init__(self, file, where: str, allowed):
        super().__init__(file)
        self._where, self._allowed = where, allowed

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._where} refers to {module}.{name}, which a checkpoint may not contain (refusing to "
            "unpickle it: a crafted file runs code this way). Only re-save checkpoints from a source you trust"
        )

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._where} holds a persistent reference, which is not admitted")


def _plain(module: str, name: str) -> bool:
    return module == "builtins" and name in _PLAIN_BUILTINS


def _torch_constant(module: str, name: str) -> bool:
    """torch.Size and torch's dtype / layout / memory-format constants."""
    if module != "torch":
        return False
    if name == "Size":
        return True
    value = getattr(torch, name, None)
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


def _dcp(module: str, name: str) -> bool:
    return _plain(module, name) or _torch_constant(module, name) or name in _DCP_CLASSES.get(module, ())


def loads_plain(data: bytes, where: str) -> Any:
    """Unpickle `data` admitting only plain builtins (dict, list, tuple, str, numbers, bool, None)."""
    return _RestrictedUnpickler(io.BytesIO(data), where, _plain).load()


def load_dcp_metadata(path: str | Path):
    """torch dist-checkpoint ``Metadata`` from a ``.metadata`` file, admitting only torch's metadata classes."""
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, str(path), _dcp).load()


_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
_NUMPY_ARRAY_GLOBALS = [
    _NUMPY_CORE.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]
"""What a pickled NumPy uint32 array needs: our RNG snapshots hold NumPy's generator state. Admitted
explicitly here, whether or not megatron.core (which registers them process-wide) was imported."""


def load_weights_only(source: str | Path | bytes, where: str) -> Any:
    """torch.load(weights_only=True) of `source` (NumPy uint32 arrays admitted); UnsafeCheckpointError
    when it holds other objects."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what the weights-only unpickler raises for a foreign global
        if "weights only" not in str(exc).lower():
            raise
        raise UnsafeCheckpointError(
            f"{where} cannot be read with torch.load(weights_only=True): {str(exc).splitlines()[0]}"
        ) from None


def check_dist_checkpoint(folder: str | Path) -> list[str]:
    """Check every pickle of a dist_checkpointing folder before megatron reads it; return problems found.

    Raises UnsafeCheckpointError for a pickle that would load code or objects not admitted; returns
    ``'<file>: ...'`` lines for data files that are missing or shorter than the metadata says (a
    cheap completeness check that needs no checksums). Nothing here unpickles with plain pickle.
    """
    folder = Path(folder)
    problems = []
    metadata_path = folder / DCP_METADATA_FILE
    if not metadata_path.is_file():
        # Without megatron's metadata.json megatron refuses the folder before reading any pickle.
        return [f"{DCP_METADATA_FILE}: missing"] if (folder / MEGATRON_CONFIG_FILE).is_file() else []
    try:
        metadata = load_dcp_metadata(metadata_path)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or garbled: pickle raises several types
        return [f"{DCP_METADATA_FILE}: unreadable ({type(exc).__name__}: {exc})"]
    if (folder / COMMON_FILE).is_file():
        try:
            common = load_weights_only(folder / COMMON_FILE, str(folder / COMMON_FILE))
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or garbled (zip and unpickling errors)
            return [f"{COMMON_FILE}: unreadable ({type(exc).__name__}: {exc})"]
        train_state = common.get("train_state") if isinstance(common, dict) else None
        if isinstance(train_state, bytes):  # written before train states were JSON
            loads_plain(train_state, f"{folder / COMMON_FILE} (train_state)")
    byte_keys = {
        key
        for key, entry in getattr(metadata, "state_dict_metadata", {}).items()
        if type(entry).__name__ == "BytesStorageMetadata"
    }
    sizes: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        relative = str(info.relative_path)
        data_path = folder / relative
        if relative not in sizes:
            sizes[relative] = data_path.stat().st_size if data_path.is_file() else -1
        if sizes[relative] == -2:  # reported already
            continue
        if sizes[relative] == -1:
            problems.append(f"{relative}: missing")
            sizes[relative] = -2
            continue
        if info.offset + info.length > sizes[relative]:
            problems.append(
                f"{relative}: truncated ({sizes[relative]} bytes, the metadata needs {info.offset + info.length})"
            )
            sizes[relative] = -2
            continue
        if index.fqn in byte_keys:
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointError(
                    f"{data_path}: byte item {index.fqn} is stored with transforms {info.transform_descriptors}; "
                    "it cannot be checked before unpickling"
                )
            with open(data_path, "rb") as f:
                f.seek(info.offset)
                item = f.read(info.length)
            try:
                load_weights_only(item, f"{data_path} (item {index.fqn})")
            except UnsafeCheckpointError:
                raise
            except Exception as exc:  # garbled bytes
                problems.append(f"{relative}: item {index.fqn} unreadable ({type(exc).__name__})")
    return problems
