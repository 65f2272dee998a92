"""Megatron torch_dist checkpoints written and read one piece at a time.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP): data files plus a `.metadata`
listing, for every key, its global shape and the stored chunks. Megatron's loader asks DCP for
the regions its model's `sharded_state_dict()` describes under the loading TP/PP layout, and DCP
reads whichever stored chunks overlap them, so any chunking loads under any layout.

Writing: we describe the checkpoint Megatron itself would save for the model (same keys, global
shapes, dtypes, `_extra_state` objects and common state) with the chunks of the requested TP
layout, each further cut along its first axis to at most `max_chunk_bytes`, and hand DCP a
planner whose `resolve_data` builds each chunk from HF reads only when it is written. Our storage
writer writes items in plan order and drops each one after writing it (DCP's FileSystemWriter
keeps every written tensor referenced until its file is closed), so peak memory is one chunk.

Reading: `DistReader.read` loads arbitrary regions through DCP with a region planner, from any
torch_dist checkpoint (ours or Megatron's, with or without optimizer state, which is never read).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from avr_megatron.checkpoint import safe_load
from avr_megatron.config.schema import ModelConfig
from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.mapping import ModelTensor

LAYER_PREFIX = "decoder.layers."
COMMON_STATE_KEY = "common_state/shard_0_1"  # Megatron's non-tensor state, here empty
DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # bounds conversion memory; any chunking loads the same
MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


@contextmanager
def _dcp_call():
    """Run a single-process DCP save/load; re-raise the original error rather than DCP's
    per-rank wrapper (a BaseException that `except Exception` would not even catch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        try:
            yield
        except CheckpointException as e:
            failures = list(e.failures.values())
            if failures:
                raise failures[0][0] from None
            raise


def storage_key(t: ModelTensor) -> str:
    """DCP key: layers share one key with the global layer index as a prepended axis."""
    if t.layer is None:
        return t.name
    return LAYER_PREFIX + t.name[len(f"{LAYER_PREFIX}{t.layer}."):]


def global_shape(t: ModelTensor, num_layers: int) -> tuple[int, ...]:
    return t.shape if t.layer is None else (num_layers, *t.shape)


def extra_state_key(t: ModelTensor, num_layers: int) -> str:
    """Megatron's ShardedObject key for the `_extra_state` of the module holding `t`: per layer,
    offset and shape along the layer axis; outside the layers, offset 0 of shape 1
    (transformer/utils.py `_get_extra_state_offsets`)."""
    module = storage_key(t).rsplit(".", 1)[0]
    if t.layer is None:
        return f"{module}._extra_state/shard_0_1"
    return f"{module}._extra_state/shard_{t.layer}_{num_layers}"


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor, in the tensor's own (layer-free) coordinates."""

    tensor: ModelTensor
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def tp_chunks(t: ModelTensor, tp: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of what each TP rank saves, as Megatron's sharded_state_dict does: the
    SwiGLU fc1 as separate gate and up pieces, other tensors cut along their partition dim."""
    shape = t.shape
    if t.param.tp_dim is None:
        return [((0,) * len(shape), shape)]
    if t.param.glu:
        half = shape[0] // 2
        step = half // tp
        return [((h * half + r * step, 0), (step, shape[1])) for r in range(tp) for h in (0, 1)]
    dim, step = t.param.tp_dim, shape[t.param.tp_dim] // tp
    out = []
    for r in range(tp):
        off = [0] * len(shape)
        size = list(shape)
        off[dim], size[dim] = r * step, step
        out.append((tuple(off), tuple(size)))
    return out


def chunks_for(t: ModelTensor, tp: int, itemsize: int, max_chunk_bytes: int) -> list[Chunk]:
    out = []
    for off, size in tp_chunks(t, tp):
        row_bytes = math.prod(size[1:]) * itemsize
        step = max(1, max_chunk_bytes // max(row_bytes, 1))
        for a in range(0, size[0], step):
            rows = min(step, size[0] - a)
            out.append(Chunk(t, (off[0] + a, *off[1:]), (rows, *size[1:])))
    return out


def _torch_save_bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


class _StreamingSavePlanner(SavePlanner):
    """Plans a fixed list of write items; tensors are produced by `make(item)` on demand."""

    def __init__(self, items: list[WriteItem],
                 make: Callable[[WriteItem], torch.Tensor | io.BytesIO]):
        self.items, self.make = items, make

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        return self.make(write_item)


class _SequentialWriter(FileSystemWriter):
    """Writes plan items in order, one at a time, into files of about `max_file_bytes`."""

    def __init__(self, path, max_file_bytes: int, progress: Callable[[int], None] | None = None):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.max_file_bytes, self.progress = max_file_bytes, progress

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        results: list[WriteResult] = []
        file_index, stream, name = 0, None, ""
        try:
            for item in plan.items:
                if stream is None or stream.tell() >= self.max_file_bytes:
                    if stream is not None:
                        _close_synced(stream)
                    name = f"{prefix}{file_index}.distcp"
                    file_index += 1
                    stream = open(Path(self.path) / name, "wb")
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(data.contiguous(), stream)
                length = stream.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
                if self.progress is not None and item.type != WriteItemType.BYTE_IO:
                    self.progress(data.numel() * data.element_size())
                del data
        finally:
            if stream is not None:
                _close_synced(stream)
        fut: Future = Future()
        fut.set_result(results)
        return fut


def _close_synced(stream) -> None:
    stream.flush()
    os.fsync(stream.fileno())
    stream.close()


def write_checkpoint(path: str | os.PathLike, m: ModelConfig, tensors: list[ModelTensor], tp: int,
                     dtype: torch.dtype, make_chunk: Callable[[Chunk], torch.Tensor], *,
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                     max_file_bytes: int = 4 << 30,
                     progress: Callable[[int], None] | None = None) -> None:
    """Write the torch_dist data of `tensors` (plus `_extra_state` objects and the common state)
    to `path`; `make_chunk(chunk)` returns the chunk's data in the tensor's own coordinates."""
    L = m.num_layers
    itemsize = torch.empty((), dtype=dtype).element_size()
    props = TensorProperties(dtype=dtype)
    items: list[WriteItem] = []
    planned: dict[MetadataIndex, Chunk | _SavedObject] = {}

    def add_object(key: str, obj) -> None:
        index = MetadataIndex(key)
        items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        planned[index] = _SavedObject(obj)

    add_object(COMMON_STATE_KEY, {})
    for t in tensors:
        key, size = storage_key(t), torch.Size(global_shape(t, L))
        for c in chunks_for(t, tp, itemsize, max_chunk_bytes):
            offsets, sizes = c.offsets, c.sizes
            if t.layer is not None:  # the prepended layer axis
                offsets, sizes = (t.layer, *offsets), (1, *sizes)
            index = MetadataIndex(key, torch.Size(offsets))
            chunk_md = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk_md, props, size)))
            planned[index] = c
        if t.param.extra_state:
            add_object(extra_state_key(t, L), None)

    def make(item: WriteItem) -> torch.Tensor | io.BytesIO:
        what = planned.pop(item.index)
        if isinstance(what, _SavedObject):
            return _torch_save_bytes([what.value])  # Megatron stores a list of shard objects
        data = make_chunk(what)
        if tuple(data.shape) != what.sizes or data.dtype != dtype:
            raise AssertionError(f"chunk of {what.tensor.name} at {what.offsets}: made "
                                 f"{data.dtype} {tuple(data.shape)}, planned {dtype} {what.sizes}")
        return data if what.tensor.layer is None else data.unsqueeze(0)

    writer = _SequentialWriter(path, max_file_bytes, progress)
    with _dcp_call():
        dcp.save({}, storage_writer=writer, planner=_StreamingSavePlanner(items, make),
                 no_dist=True)


@dataclass(frozen=True)
class _SavedObject:
    value: object


class _CachedReader(FileSystemReader):
    """Reads `.metadata` once (it can be large when optimizer state is in the checkpoint)."""

    _md: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._md is None:
            self._md = super().read_metadata(*args, **kwargs)
        return self._md


class _RegionLoadPlanner(LoadPlanner):
    """Loads given regions (key, offsets, sizes) into given tensors."""

    def __init__(self, regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, wanted in self.regions.items():
            chunks = [ChunkStorageMetadata(torch.Size(off), dest.shape) for off, dest in wanted]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                      chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("region reads load no objects")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.regions[read_item.dest_index.fqn][read_item.dest_index.index][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class DistReader:
    """Tensor metadata and region reads of a torch_dist checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise ConversionError(f"{self.path}: no torch_dist checkpoint here (.metadata missing)")
        safe_load.install()  # `.metadata` is unpickled with the metadata types only
        self._reader = _CachedReader(str(self.path))
        try:
            with safe_load.guarded():
                self.metadata = self._reader.read_metadata()
        except safe_load.UnsafeCheckpointError as e:
            raise ConversionError(f"not loaded: {e}") from None
        except Exception as e:
            raise ConversionError(f"{self.path / '.metadata'}: unreadable ({e})") from None
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}

    def read(self, requests: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
             ) -> list[torch.Tensor]:
        """Tensors for (key, offsets, sizes) regions, in the stored dtype, in one DCP load."""
        regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        out = []
        for key, offsets, sizes in requests:
            dest = torch.empty(sizes, dtype=self.tensors[key].properties.dtype)
            regions.setdefault(key, []).append((tuple(offsets), dest))
            out.append(dest)
        try:
            with safe_load.guarded(), _dcp_call():
                dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions),
                         no_dist=True)
        except safe_load.UnsafeCheckpointError as e:
            raise ConversionError(f"{self.path}: not loaded: {e}") from None
        except Exception as e:
            keys = sorted(regions)
            raise ConversionError(f"{self.path}: cannot read {', '.join(keys)}: "
                                  f"{type(e).__name__}: {e}") from e
        return out

    def row_blocks(self, key: str) -> Iterator[tuple[int, int]]:
        """Row ranges [a, b) along dim 0 that each lie within stored chunks' row boundaries, so
        reading them one by one reads every stored chunk once."""
        md = self.tensors[key]
        cuts = sorted({0, md.size[0]} | {c.offsets[0] for c in md.chunks}
                      | {c.offsets[0] + c.sizes[0] for c in md.chunks})
        yield from zip(cuts[:-1], cuts[1:])
