"""Reading a torch_dist checkpoint runs no code from it.

A PyTorch Distributed Checkpoint holds two kinds of pickles, both read with full `pickle` by the
installed torch and Megatron-Core, so a crafted checkpoint ran its payload on load:

- `.metadata`: `FileSystemReader.read_metadata` calls `pickle.load` (every reader: ours in
  `conversion.dist_io`, Megatron's `FileSystemReader` / `CachedMetadataFileSystemReader` under
  `dist_checkpointing.load`);
- byte objects inside the `.distcp` files (Megatron's common state, `_extra_state`, any
  ShardedObject): `DefaultLoadPlanner.load_bytes` (and Megatron's `MCoreLoadPlanner`, which
  inherits it) calls `torch.load(weights_only=False)`.

`install()` (idempotent; run when our checkpoint modules are imported and again before every
load) replaces both for this process:

- `.metadata` goes through `MetadataUnpickler`, which resolves only the classes a DCP metadata
  file is made of (the dataclasses and enums of `torch.distributed.checkpoint.metadata` and
  `.planner`, `filesystem._StorageInfo`, `torch.Size`, torch dtypes and layouts, paths) and
  refuses any other global before it is called;
- byte objects load with `torch.load(weights_only=True)`: tensors, containers and plain values
  only (the tensor data was already read with `weights_only=True` by torch).

Anything else raises `UnsafeCheckpointError` naming the file and the refused global. Megatron's
legacy `common.pt` (never written by us) is checked the same way before Megatron loads it.
Writing is unchanged (`pickle.dump`).
"""

from __future__ import annotations

import io
import os
import pickle
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds a pickle that would run code or build an unexpected object."""


_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "Metadata",
        "MetadataIndex"},
    "torch.distributed.checkpoint.planner": {
        "WriteItemType", "LoadItemType", "BytesIOWriteData", "TensorWriteData", "WriteItem",
        "SavePlan"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # returns a torch.layout by its name, nothing else
    "collections": {"OrderedDict"},
    # StorageMeta.checkpoint_id is the path DCP was given, which may be a Path object.
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "builtins": {"set", "frozenset"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, resolving only the metadata types."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout,
                                                         torch.memory_format)):
                return value
        raise UnsafeCheckpointError(
            f"refused to load {module}.{name}: a torch_dist .metadata file holds only checkpoint "
            "metadata types; this one was crafted or is not a checkpoint")


# Refusals of this process, newest last: DCP reports a failed metadata read as an AssertionError
# (or a CheckpointException) carrying only the message, so `guarded()` looks here.
_refusals: list[str] = []


def _refuse(message: str) -> UnsafeCheckpointError:
    _refusals.append(message)
    return UnsafeCheckpointError(message)


@contextmanager
def guarded() -> Iterator[None]:
    """Run a load; if it failed after a refusal, raise UnsafeCheckpointError with that
    refusal's message instead of DCP's wrapper."""
    start = len(_refusals)
    try:
        yield
    except UnsafeCheckpointError:
        raise
    except BaseException:
        if len(_refusals) > start:
            raise UnsafeCheckpointError(_refusals[-1]) from None
        raise


def load_metadata(stream, where: str | os.PathLike = ".metadata"):
    """A DCP Metadata object from `stream`, or UnsafeCheckpointError naming `where`."""
    try:
        return MetadataUnpickler(stream).load()
    except UnsafeCheckpointError as e:
        raise _refuse(f"{where}: {e}") from None


class _RestrictedPickleModule(types.ModuleType):
    """Stands in for `pickle` inside torch.distributed.checkpoint.filesystem: `load` is
    restricted, everything else (dump, ...) is the real module's."""

    def __init__(self):
        super().__init__("pickle")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file, *args, **kwargs):
        return load_metadata(file, getattr(file, "name", ".metadata"))

    @staticmethod
    def loads(data, *args, **kwargs):
        return load_metadata(io.BytesIO(data))


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with `weights_only=True` (was False)."""
    from torch.distributed.checkpoint._traverse import set_element

    try:
        # torch's own dcp.save pickles a BytesIO value as the BytesIO object (Megatron writes
        # the bytes raw and unpickles them itself, also with weights_only=True).
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(
            f"object {read_item.dest_index.fqn!r} of the checkpoint: refused to unpickle it "
            f"(only tensors and plain values are loaded): {_reason(e)}") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


_installed = False


def install() -> None:
    """Route every DCP metadata and byte-object load of this process through the restricted
    loaders (see the module docstring)."""
    global _installed
    if _installed:
        return
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.pickle = _RestrictedPickleModule()
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
    _installed = True


def check_legacy_common(checkpoint_dir: str | os.PathLike) -> None:
    """Megatron reads a legacy `common.pt` with `torch.load`'s default, which the environment
    (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn into full pickle: check it first."""
    path = Path(checkpoint_dir) / "common.pt"
    if path.is_file():
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refuse(f"{path}: refused to unpickle it (only tensors and plain values are "
                          f"loaded): {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """The line of torch's weights-only error that names the refused global."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln]
    return (named or lines or [type(error).__name__])[0]
