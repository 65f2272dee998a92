"""config/resolve.py: recipe -> validated -> resolved and frozen run config."""

import copy
import dataclasses
import json
import subprocess
import sys

import pytest

from avr_megatron.config import ConfigError, load_config, to_yaml
from avr_megatron.config.hf_model import model_config_from_hf
from avr_megatron.config.resolve import (HF_MODEL_KEYS, resolve_config, resolve_iterations,
                                         train_iterations)
from avr_megatron.config.schema import is_frozen

# A small Llama config.json whose shape differs from the tiny preset on every shape key.
HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96,
      "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 6,
      "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 200, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 256, "rope_theta": 50000.0, "tie_word_embeddings": True,
      "hidden_act": "silu"}


def _tiny(tmp_path, *overrides):
    return load_config("recipes/tiny.yaml", [f"run.dir={tmp_path}", *overrides])


def _old_adopt(cfg):
    """What training/init.adopt_hf_model_config did in place before the resolve step."""
    m = model_config_from_hf(HF, cfg.model)
    for k in HF_MODEL_KEYS:
        setattr(cfg.model, k, getattr(m, k))
    return cfg


def test_model_shape_from_hf_config_as_the_old_code_did(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF))
    cfg = _tiny(tmp_path, f"model.init_from.hf={hf}")
    before = to_yaml(cfg)
    resolved = resolve_config(cfg)
    assert to_yaml(cfg) == before  # the recipe's config is not changed
    assert dataclasses.asdict(resolved) == dataclasses.asdict(_old_adopt(copy.deepcopy(cfg)))
    assert (resolved.model.num_layers, resolved.model.hidden_size, resolved.model.vocab_size,
            resolved.model.kv_channels) == (3, 96, 200, 16)


def test_without_hf_source_the_resolved_config_equals_the_recipe(tmp_path):
    cfg = _tiny(tmp_path)
    resolved = resolve_config(cfg)
    assert resolved is not cfg and dataclasses.asdict(resolved) == dataclasses.asdict(cfg)


def test_bad_hf_config_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(HF, model_type="mistral")))
    with pytest.raises(ConfigError, match=r"model.init_from.hf: .*config.json: model_type"):
        resolve_config(_tiny(tmp_path, f"model.init_from.hf={tmp_path}"))
    # The adopted shape is validated like a recipe's (2 KV heads do not split over TP=4).
    (tmp_path / "config.json").write_text(json.dumps(HF))
    with pytest.raises(ConfigError, match="model.num_query_groups=2 is not divisible"):
        resolve_config(_tiny(tmp_path, f"model.init_from.hf={tmp_path}",
                             "parallel.tensor_model_parallel_size=4"))


def test_resolved_config_is_read_only(tmp_path):
    resolved = resolve_config(_tiny(tmp_path))
    assert is_frozen(resolved) and is_frozen(resolved.model.rope_scaling)
    with pytest.raises(dataclasses.FrozenInstanceError, match="train.train_iters"):
        resolved.train.train_iters = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match="model.rope_scaling.factor"):
        resolved.model.rope_scaling.factor = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.model = None
    assert to_yaml(resolved) == to_yaml(_tiny(tmp_path))  # saved like any config
    mine = copy.deepcopy(resolved)  # a private copy is writable again
    mine.train.train_iters = 3
    assert not is_frozen(mine) and resolved.train.train_iters == 40


def test_iterations_from_epochs(tmp_path):
    cfg = resolve_config(_tiny(tmp_path, "data.num_epochs=3"))
    assert train_iterations(cfg, 7) == 21
    out = resolve_iterations(cfg, 7)
    assert out.train.train_iters == 21 and is_frozen(out) and cfg.train.train_iters == 40
    plain = resolve_config(_tiny(tmp_path))
    assert resolve_iterations(plain, 7) is plain  # train.train_iters as given
    unresolved = _tiny(tmp_path)
    again = resolve_iterations(unresolved, 7)
    assert is_frozen(again) and not is_frozen(unresolved) and again.train.train_iters == 40


def test_resolve_imports_no_torch():
    code = ("import sys, avr_megatron.config.resolve, avr_megatron.config.layout, "
            "avr_megatron.config.hf_model; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
