"""Converted checkpoints in Megatron: logits equal the HF model's at TP=1 and TP=2, weights are
the hand-built reference, PP=2 (and interleaved PP=2 x VPP=2) load the same weights, the stored
structure is exactly what Megatron itself saves, and Megatron's own saves (TP=2, PP=2) export
back to the original HF tensors.

One `torchrun --nproc-per-node 2` launch covers every case and layout."""

import pytest
import torch
from safetensors.torch import load_file

from avr_megatron.conversion import convert_hf_to_mcore, convert_mcore_to_hf
from avr_megatron.testing.distributed import run_distributed
from avr_megatron.testing.te_layout import TE_ONLY_OBJECTS

pytestmark = pytest.mark.slow


def _full_logits(chunks, tokens):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = chunks[0](tokens, positions, None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def _load(ckpt, tp, pp, vpp=None):
    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, read_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import initialize

    cfg = read_config(ckpt)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.virtual_pipeline_model_parallel_size = vpp
    initialize(cfg)
    chunks = build_model(cfg)
    load_checkpoint(ckpt, chunks)
    return cfg, chunks


def _parity(cases):
    from avr_megatron.checkpoint.dist_ckpt import save_checkpoint
    from avr_megatron.testing.state import gather_full

    results = {}
    for name, case in cases.items():
        r = results[name] = {}
        weights = {}
        for tp in (1, 2):
            cfg, chunks = _load(case["ckpt"], tp, 1)
            vocab, tied = cfg.model.vocab_size, cfg.model.tie_word_embeddings
            logits = _full_logits(chunks, case["tokens"])[..., :vocab]
            r[f"logits_tp{tp}"] = (logits - case["ref_logits"]).abs().max().item()
            weights[tp] = gather_full(chunks, tied)
            if tp == 2:  # what Megatron itself writes for this model at TP=2
                save_checkpoint(case["resave"], 0, chunks, cfg)
        cfg, chunks = _load(case["ckpt"], 1, 2)
        weights["pp2"] = gather_full(chunks, cfg.model.tie_word_embeddings)
        save_checkpoint(case["resave_pp"], 0, chunks, cfg)
        others = [2, "pp2"]
        if cfg.model.num_layers % 4 == 0:  # interleaved: 2 stages x 2 virtual chunks
            cfg, chunks = _load(case["ckpt"], 1, 2, vpp=2)
            weights["vpp2"] = gather_full(chunks, cfg.model.tie_word_embeddings)
            others.append("vpp2")
        r["layouts"] = others
        for other in others:
            r[f"same_weights_{other}"] = weights[other].keys() == weights[1].keys() and all(
                torch.equal(weights[other][k], weights[1][k]) for k in weights[1])
        r["weights"] = weights[1]
    return results


def _layout(ckpt_dir):
    """key -> (kind, global size, dtype, sorted chunks) from a torch_dist .metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    out = {}
    for key, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            out[key] = ("tensor", tuple(v.size), v.properties.dtype,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
        else:
            out[key] = ("bytes",)
    return out


def test_converted_checkpoints_match_hf_and_megatron(tmp_path, tiny_hf, reference):
    from transformers import LlamaForCausalLM

    from avr_megatron.checkpoint.dist_ckpt import read_config

    cases, hf_weights = {}, {}
    for i, name in enumerate(["gqa_untied", "tied_mha", "gqa4_headdim"]):
        src = tiny_hf(name)
        ckpt = convert_hf_to_mcore(src, tmp_path / name / "ckpt", tp=2, progress=False)
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        tokens = torch.randint(0, model.config.vocab_size, (2, 24),
                               generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref_logits = model(tokens).logits
        hf_weights[name] = load_file(src / "model.safetensors")
        cases[name] = {"ckpt": str(ckpt), "tokens": tokens, "ref_logits": ref_logits,
                       "resave": str(tmp_path / name / "resave"),
                       "resave_pp": str(tmp_path / name / "resave_pp")}
    results = run_distributed(_parity, nproc=2, cases=cases)
    assert "vpp2" in results[0]["gqa4_headdim"]["layouts"]
    for name, case in cases.items():
        for r in results:
            res = r[name]
            assert res["logits_tp1"] < 1e-5 and res["logits_tp2"] < 1e-5, (name, res)
            assert all(res[f"same_weights_{o}"] for o in res["layouts"]), (name, res)
        m = read_config(case["ckpt"]).model
        reference.assert_same(results[0][name]["weights"],
                              reference.weights(hf_weights[name], m), m.vocab_size)
        # Same keys, shapes, dtypes, chunks, _extra_state objects as Megatron's own TP=2 save,
        # plus the Transformer Engine spec's final-norm extra state (testing/te_layout.py).
        ours = _layout(tmp_path / name / "ckpt" / "iter_0000000")
        megatron = _layout(tmp_path / name / "resave" / "iter_0000000")
        megatron.update({f"{key}/shard_0_1": ("bytes",) for key in TE_ONLY_OBJECTS})
        assert ours == megatron, {k: (ours.get(k), megatron.get(k))
                                  for k in ours.keys() | megatron.keys()
                                  if ours.get(k) != megatron.get(k)}
        # Megatron's own saves (TP=2, and PP=2) export to the original HF tensors.
        for saved in ("resave", "resave_pp"):
            out = convert_mcore_to_hf(case[saved], tmp_path / name / f"hf_{saved}",
                                      tokenizer=tiny_hf(name), progress=False)
            exported = load_file(out / "model.safetensors")
            assert exported.keys() == hf_weights[name].keys()
            assert all(torch.equal(exported[k], hf_weights[name][k]) for k in exported), name
