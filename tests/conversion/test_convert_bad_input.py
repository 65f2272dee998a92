"""Every bad input fails with an error naming the problem, and leaves no output behind."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from avr_megatron.conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf

WEIGHTS = "model.safetensors"


def _no_output(tmp_path, out):
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "temporary dir left"


@pytest.fixture
def hf_copy(tmp_path, tiny_hf):
    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf("gqa_untied"), dst)
    return dst


def _edit_weights(folder, fn):
    sd = load_file(folder / WEIGHTS)
    fn(sd)
    save_file(sd, folder / WEIGHTS, metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _expect(tmp_path, hf_dir, match, **kwargs):
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(ConversionError, match=match):
        convert_hf_to_mcore(hf_dir, out, progress=False, **kwargs)
    _no_output(tmp_path, out)


def test_missing_tensor(tmp_path, hf_copy):
    _edit_weights(hf_copy, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    _expect(tmp_path, hf_copy, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight")


def test_extra_tensor(tmp_path, hf_copy):
    import torch

    _edit_weights(hf_copy, lambda sd: sd.update(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    _expect(tmp_path, hf_copy, r"unexpected tensors.*model\.layers\.0\.self_attn\.q_proj\.bias")


def test_shape_mismatch(tmp_path, hf_copy):
    import torch

    _edit_weights(hf_copy, lambda sd: sd.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    _expect(tmp_path, hf_copy, r"model\.layers\.0\.self_attn\.k_proj\.weight in "
                               r"model\.safetensors: shape \[16, 64\], expected \[32, 64\]")


def test_moe_and_other_architectures(tmp_path, hf_copy):
    _edit_config(hf_copy, model_type="mixtral", num_local_experts=4)
    _expect(tmp_path, hf_copy, "mixture-of-experts models are not supported")
    _edit_config(hf_copy, model_type="qwen2", num_local_experts=None)
    _expect(tmp_path, hf_copy, r"config\.json: model_type='qwen2' is not supported")


def test_bad_config_values(tmp_path, hf_copy):
    _expect(tmp_path, hf_copy, r"num_attention_heads=4 is not divisible by --tp 3", tp=3)
    _expect(tmp_path, hf_copy, r"num_hidden_layers=2 is not divisible by --pp 3", pp=3)
    _edit_config(hf_copy, attention_bias=True)
    _expect(tmp_path, hf_copy, "attention_bias=True is not supported")


def test_truncated_shard(tmp_path, hf_copy):
    data = (hf_copy / WEIGHTS).read_bytes()
    (hf_copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    _expect(tmp_path, hf_copy, r"model\.safetensors: corrupt or truncated safetensors file")


def test_corrupt_header(tmp_path, hf_copy):
    data = bytearray((hf_copy / WEIGHTS).read_bytes())
    data[8:20] = b"\x00garbage\xff\xfe!!"
    (hf_copy / WEIGHTS).write_bytes(bytes(data))
    _expect(tmp_path, hf_copy, "header is not valid JSON")


def test_index_naming_a_missing_shard(tmp_path, hf_copy):
    (hf_copy / WEIGHTS).rename(hf_copy / "model-00001-of-00002.safetensors")
    names = load_file(hf_copy / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _expect(tmp_path, hf_copy, "model-00002-of-00002.safetensors: shard named in the weight "
                               "index does not exist")


def test_existing_output_is_left_alone(tmp_path, hf_copy):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_hf_to_mcore(hf_copy, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_mid_write_leaves_nothing(tmp_path, hf_copy, monkeypatch):
    from avr_megatron.conversion import hf_weights

    calls = {"n": 0}
    real = hf_weights.HFWeights.read

    def flaky(self, name, rows=None):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk went away")
        return real(self, name, rows)

    monkeypatch.setattr(hf_weights.HFWeights, "read", flaky)
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_mcore(hf_copy, out, progress=False)
    _no_output(tmp_path, out)


@pytest.fixture
def ckpt(tmp_path, tiny_hf):
    return convert_hf_to_mcore(tiny_hf("gqa_untied"), tmp_path / "ckpt", progress=False)


def _expect_export(tmp_path, ckpt, match, **kwargs):
    out = tmp_path / "exp" / "hf"
    with pytest.raises(ConversionError, match=match):
        convert_mcore_to_hf(ckpt, out, progress=False, **kwargs)
    _no_output(tmp_path, out)


def test_export_config_disagreeing_with_tensors(tmp_path, ckpt):
    cfg = ckpt / "iter_0000000" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("ffn_hidden_size: 128", "ffn_hidden_size: 256"))
    _expect_export(tmp_path, ckpt, r"decoder\.layers\.mlp\.linear_fc1\.weight: shape \[2, 256, "
                                   r"64\], expected \[2, 512, 64\]")


def test_export_without_tokenizer_or_checkpoint(tmp_path, ckpt):
    shutil.rmtree(ckpt / "iter_0000000" / "hf")
    _expect_export(tmp_path, ckpt, "carries no tokenizer.*pass --tokenizer")
    _expect_export(tmp_path, tmp_path / "nowhere", "no checkpoint at .*nowhere")


def test_export_failure_mid_write_leaves_nothing(tmp_path, ckpt, monkeypatch):
    from avr_megatron.conversion import safetensors_io

    real, calls = safetensors_io.SafetensorsWriter.write, {"n": 0}

    def flaky(self, name, piece):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, piece)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", flaky)
    out = tmp_path / "exp" / "hf"
    with pytest.raises(KeyboardInterrupt):
        convert_mcore_to_hf(ckpt, out, progress=False)
    _no_output(tmp_path, out)


def test_killed_conversions_temporaries_are_removed_at_start(tmp_path, tiny_hf):
    """A conversion killed outright leaves `.NAME.tmp-HOST-PID` (full size at 70B); the next
    conversion into the same directory removes those of dead processes, not live ones."""
    import os
    import subprocess
    import sys

    from avr_megatron.runtime.files import owner_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().rsplit("-", 1)[0]
    parent = tmp_path / "out"
    stale = [parent / f".ckpt.tmp-{host}-{dead.pid}", parent / f".other.tmp-{dead.pid}"]
    live = parent / f".ckpt.tmp-{host}-{os.getppid()}"
    for d in (*stale, live):
        d.mkdir(parents=True)
        (d / "shard.distcp").write_bytes(b"\0" * 1024)
    convert_hf_to_mcore(tiny_hf("gqa_untied"), parent / "ckpt", progress=False)
    assert sorted(p.name for p in parent.iterdir()) == sorted(["ckpt", live.name])
