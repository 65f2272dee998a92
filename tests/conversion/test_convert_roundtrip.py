"""HF -> Megatron -> HF: bit-identical tensors, equivalent config, loadable by transformers."""

import json

import torch
from safetensors.torch import load_file

from avr_megatron.conversion import convert_hf_to_mcore, convert_mcore_to_hf


def hf_tensors(folder):
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    out = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def _config(folder):
    from transformers import LlamaConfig

    d = LlamaConfig.from_pretrained(folder).to_dict()
    d.pop("transformers_version", None)
    d.pop("_name_or_path", None)
    return d


def test_round_trip_is_bit_identical(tmp_path, tiny_hf, case):
    from transformers import LlamaForCausalLM

    src = tiny_hf(case)
    # Small chunks and shards so both row-splitting and the shard index are exercised.
    convert_hf_to_mcore(src, tmp_path / "ckpt", tp=2, max_chunk_bytes=3000, progress=False)
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=60_000,
                        progress=False)
    out = tmp_path / "out"
    a, b = hf_tensors(src), hf_tensors(out)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())

    assert _config(src) == _config(out)
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and \
        not info["mismatched_keys"], info
    ref = LlamaForCausalLM.from_pretrained(src)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)


def test_dtype_conversion_both_ways(tmp_path, tiny_hf):
    src = tiny_hf("gqa_untied")
    convert_hf_to_mcore(src, tmp_path / "ckpt", dtype="bf16", progress=False)
    meta = json.loads((tmp_path / "ckpt/iter_0000000/avr_checkpoint.json").read_text())
    assert meta["converted_from"]["dtype"] == "torch.bfloat16"
    assert "bf16: true" in (tmp_path / "ckpt/iter_0000000/config.yaml").read_text()
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "bf16", progress=False)
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "fp32", dtype="fp32", progress=False)
    a, b16, b32 = hf_tensors(src), hf_tensors(tmp_path / "bf16"), hf_tensors(tmp_path / "fp32")
    for name in a:
        assert b16[name].dtype == torch.bfloat16 and torch.equal(b16[name], a[name].bfloat16())
        assert b32[name].dtype == torch.float32 and torch.equal(b32[name], b16[name].float())
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16/model.safetensors").exists()  # one shard: no index, like HF


def test_checkpoint_layout(tmp_path, tiny_hf):
    """The checkpoint root resolves like a trainer checkpoint and rebuilds its recipe."""
    from avr_megatron.checkpoint.dist_ckpt import hf_assets, read_config, read_meta, resolve

    src = tiny_hf("tied_mha")
    root = convert_hf_to_mcore(src, tmp_path / "ckpt", tp=2, pp=2, progress=False)
    assert resolve(root).name == "iter_0000000"
    cfg = read_config(root)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.model.tie_word_embeddings and cfg.model.vocab_size == 384
    assert cfg.model.rope_scaling.type is None
    assert read_meta(root)["has_optimizer"] is False
    assert (hf_assets(root) / "tokenizer.json").is_file()
    assert json.loads((resolve(root) / "metadata.json").read_text())["sharded_backend"] == \
        "torch_dist"


def test_other_input_layouts(tmp_path, tiny_hf):
    """Sharded safetensors with an index, legacy pytorch_model.bin, and the redundant tensors
    some checkpoints carry (a tied lm_head copy, rotary inv_freq buffers) all convert the same."""
    import shutil

    from transformers import LlamaForCausalLM

    src = tiny_hf("tied_mha")
    ref = hf_tensors(src)
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, sharded / name)
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    (legacy / "model.safetensors").unlink()
    extra = dict(ref, **{"lm_head.weight": ref["model.embed_tokens.weight"].clone(),
                         "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    torch.save(extra, legacy / "pytorch_model.bin")
    for folder in (sharded, legacy):
        convert_hf_to_mcore(folder, tmp_path / f"{folder.name}_ckpt", progress=False)
        out = convert_mcore_to_hf(tmp_path / f"{folder.name}_ckpt", tmp_path / f"{folder.name}_hf",
                                  progress=False)
        back = hf_tensors(out)
        assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
