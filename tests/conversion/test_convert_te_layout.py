"""Converted checkpoints hold exactly the Transformer Engine spec's dist-checkpoint keys, and
load into it; checkpoints without the TE-only `_extra_state` (older conversions, local-spec runs)
load too, while a missing tensor is still an error; FP8 extra state resumes through the vetted
path and crafted extra state is refused. The TE spec's layout comes from
`avr_megatron.testing.te_layout` (why it is the local layout plus one object: its docstring)."""

import pytest

from avr_megatron.conversion import convert_hf_to_mcore
from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _layout(ckpt_dir):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {key: (("tensor", tuple(v.size), v.properties.dtype,
                   sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
                  if isinstance(v, TensorStorageMetadata) else ("bytes",))
            for key, v in md.state_dict_metadata.items()}


def _case(conv, tmp):
    import os
    import pickle
    from pathlib import Path

    import torch

    from avr_megatron.checkpoint.dist_ckpt import (
        CheckpointError,
        load_checkpoint,
        read_config,
        resolve,
        save_checkpoint,
    )
    from avr_megatron.checkpoint.extra_state import UNSAFE_PICKLE_ENV
    from avr_megatron.models.llama import build_model, unwrap
    from avr_megatron.testing.state import gather_full
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.testing import te_layout

    tmp = Path(tmp)
    cfg = read_config(conv)
    initialize(cfg)
    out = {}

    def model(extra=None):
        return te_layout.te_like(build_model(cfg), extra)

    def norm(chunks):
        return unwrap(chunks[-1]).decoder.final_layernorm

    # Megatron's own save of the TE spec's layout, to compare the converted one with.
    te_model = model()
    load_checkpoint(conv, te_model)
    save_checkpoint(tmp / "te_resave", 0, te_model, cfg)
    weights = gather_full(te_model, cfg.model.tie_word_embeddings)
    out["layouts"] = (_layout(resolve(conv)), _layout(tmp / "te_resave" / "iter_0000000"))
    # A local-spec save lacks the final norm's extra state: loads into the TE layout.
    local = build_model(cfg)
    load_checkpoint(conv, local)
    save_checkpoint(tmp / "local", 0, local, cfg)
    again = model()
    load_checkpoint(tmp / "local", again)
    out["local_into_te_same"] = all(torch.equal(weights[k], v) for k, v in
                                    gather_full(again, cfg.model.tie_word_embeddings).items())
    # A missing tensor is an error that names it: a tied model's checkpoint has no output layer.
    assert not cfg.model.tie_word_embeddings
    cfg.model.tie_word_embeddings = True
    save_checkpoint(tmp / "tied", 0, build_model(cfg), cfg)
    cfg.model.tie_word_embeddings = False
    try:
        load_checkpoint(tmp / "tied", model())
        out["missing_tensor"] = "loaded"
    except CheckpointError as e:
        out["missing_tensor"] = str(e)

    # FP8 (delayed scaling) extra state: TE refuses to unpickle it on its own; our load vets it.
    added = te_layout.install_recipe_stand_ins()
    try:
        save_checkpoint(tmp / "fp8", 1, model(lambda: te_layout.delayed_scaling_payload(5.0)), cfg)
        resumed = model()
        load_checkpoint(tmp / "fp8", resumed)
        out["fp8_scale"] = norm(resumed).te_like_loaded["scale_fwd"].tolist()
        out["flag_left_set"] = UNSAFE_PICKLE_ENV in os.environ

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp / 'ran'}",))

        evil = torch.frombuffer(bytearray(pickle.dumps({"recipe": Evil()})), dtype=torch.uint8)
        save_checkpoint(tmp / "evil", 1, model(lambda: evil), cfg)
        try:
            load_checkpoint(tmp / "evil", model())
            out["evil"] = "loaded"
        except CheckpointError as e:
            out["evil"] = str(e)
        out["evil_ran"] = (tmp / "ran").exists()
    finally:
        te_layout.remove_recipe_stand_ins(added)
    return out


def test_converted_checkpoints_fit_the_te_spec_layout(tmp_path, tiny_hf):
    conv = convert_hf_to_mcore(tiny_hf("gqa_untied"), tmp_path / "conv", tp=1, progress=False)
    r = run_distributed(_case, nproc=1, timeout=300, conv=str(conv), tmp=str(tmp_path))[0]
    ours, te = r["layouts"]
    assert ours == te, {k: (ours.get(k), te.get(k)) for k in ours.keys() | te.keys()
                        if ours.get(k) != te.get(k)}
    assert "decoder.final_layernorm._extra_state/shard_0_1" in ours
    assert r["local_into_te_same"]
    assert "lacks 1 tensor(s) or object(s) this model needs: output_layer.weight" in \
        r["missing_tensor"], r["missing_tensor"]
    assert r["fp8_scale"] == [5.0, 5.0, 5.0] and not r["flag_left_set"]
    assert "not loaded" in r["evil"] and "decoder.final_layernorm._extra_state" in r["evil"]
    assert "posix.system" in r["evil"] and not r["evil_ran"], r["evil"]
