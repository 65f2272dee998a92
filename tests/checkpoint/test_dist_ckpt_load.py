"""Single-process checks of how dist_ckpt hands a loaded checkpoint to the model chunks."""

import json

import torch

from avr_megatron.checkpoint import dist_ckpt


class _Chunk(torch.nn.Module):
    """Stands in for a GPTModel chunk: records the state dict it is given."""

    def __init__(self, index):
        super().__init__()
        self.index, self.loaded = index, None

    def sharded_state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state, strict=True):
        self.loaded = state
        return torch.nn.modules.module._IncompatibleKeys([], [])


def test_virtual_pipeline_chunks_load_their_own_state_in_numeric_order(tmp_path, monkeypatch):
    """model10 and model11 sort before model2 as strings; chunk i must get model{i}."""
    from megatron.core import dist_checkpointing

    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / dist_ckpt.META_FILE).write_text(json.dumps(
        {"format": dist_ckpt.FORMAT, "iteration": 1, "has_optimizer": False}))
    chunks = [_Chunk(i) for i in range(12)]
    requested = {}

    def fake_load(sharded, path, **kwargs):
        requested.update(sharded)
        return {key: {"from": key} for key in sharded}, set(), set()

    monkeypatch.setattr(dist_checkpointing, "load", fake_load)
    dist_ckpt.load_checkpoint(ckpt, chunks)
    assert list(requested) == [f"model{i}" for i in range(12)]
    assert [c.loaded["from"] for c in chunks] == [f"model{i}" for i in range(12)]
    assert dist_ckpt.chunk_key(0, 1) == "model"
