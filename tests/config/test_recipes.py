"""Every shipped recipe loads and validates, and the full-scale layouts add up: the parallel
layout fills the Slurm allocation, divides the model, and the memory table in each recipe's
comment matches an independent Llama parameter/memory count."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from avr_megatron.config import ConfigError, load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))


def _parents() -> set[str]:
    named = set()
    for path in ALL:
        parents = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        named.update([parents] if isinstance(parents, str) else parents)
    return named


LEAVES = [p for p in ALL if p.name not in _parents()]
FULL_SCALE = [RECIPES / "llama3_8b.yaml", RECIPES / "llama3_70b.yaml"]


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_recipe_loads(path):
    load_config(path, validate=False)


@pytest.mark.parametrize("path", LEAVES, ids=[p.name for p in LEAVES])
def test_every_runnable_recipe_validates(path):
    load_config(path)


def test_full_scale_recipes_are_leaves():
    assert set(FULL_SCALE) <= set(LEAVES)
    assert {"base.yaml", "llama3_base.yaml"} <= _parents()


@pytest.mark.parametrize("path", FULL_SCALE, ids=[p.name for p in FULL_SCALE])
def test_layout_fills_the_allocation_and_divides_the_model(path):
    cfg = load_config(path)
    p, m, t, res = cfg.parallel, cfg.model, cfg.train, cfg.launch.slurm.train
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    world = res.nodes * res.gpus_per_node
    assert world % (tp * pp * cp) == 0
    dp = world // (tp * pp * cp)
    assert tp <= res.gpus_per_node, "tensor parallelism should stay inside a node"
    assert m.num_attention_heads % tp == 0 and m.num_query_groups % tp == 0
    assert m.num_layers % (pp * (p.virtual_pipeline_model_parallel_size or 1)) == 0
    assert m.make_vocab_size_divisible_by % tp == 0
    assert _padded_vocab(m) % tp == 0
    assert t.global_batch_size % (t.micro_batch_size * dp) == 0
    if p.virtual_pipeline_model_parallel_size:
        assert (t.global_batch_size // (t.micro_batch_size * dp)) % pp == 0
    for role in ("policy", "reward"):
        engine = getattr(cfg.synth, role)
        assert engine.backend == "vllm"
        assert engine.tensor_parallel_size <= cfg.launch.slurm.synth.gpus_per_node
    assert cfg.synth.policy.gpu_memory_utilization + cfg.synth.reward.gpu_memory_utilization <= 0.95
    assert cfg.pipeline.executor == "slurm"


def test_70b_layout_is_the_documented_one():
    cfg = load_config(RECIPES / "llama3_70b.yaml")
    p, res = cfg.parallel, cfg.launch.slurm.train
    world = res.nodes * res.gpus_per_node
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size, dp, world) == (8, 4, 5, 2, 64)
    assert cfg.precision.fp8 == "hybrid" and cfg.precision.bf16


# The paper's values (see /work/shared/notes/avr-method.md), shared by both full-scale recipes.
@pytest.mark.parametrize("path", FULL_SCALE, ids=[p.name for p in FULL_SCALE])
def test_paper_hyperparameters(path):
    cfg = load_config(path)
    s = cfg.synth
    assert (s.sampling.temperature, s.sampling.top_p) == (0.7, 0.8)
    assert (s.stage1.k, s.stage1.m, s.stage2.k, s.stage2.m) == (2, 2, 2, 2)
    assert s.stage2.max_rounds == 5 and s.thoughts.num_samples == 5
    assert cfg.loss.beta == 0.1 and cfg.loss.type == "sigmoid"
    stages = cfg.pipeline.stages
    assert stages["stage1_dpo"]["loss"]["beta"] == 0.1 and stages["lcdpo"]["loss"]["beta"] == 0.1
    assert stages["stage2_search"]["synth"]["input"]["limit"] == 10000


STAGES = ("stage1_trees_base", "stage1_pairs_base", "rsft", "stage1_trees", "stage1_pairs",
          "stage1_ref_logps", "stage1_dpo", "stage2_search", "stage2_sft_data", "thought_sft",
          "stage2_thoughts", "stage2_pairs", "lcdpo_ref_logps", "lcdpo", "eval")


def _dotlist(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _dotlist(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


@pytest.mark.parametrize("path", FULL_SCALE, ids=[p.name for p in FULL_SCALE])
def test_stage_overrides_name_stages_and_validate(path):
    cfg = load_config(path)
    for name, override in cfg.pipeline.stages.items():
        assert name in STAGES, f"{path.name}: unknown stage {name!r}"
        load_config(path, _dotlist(override))  # the stage's own config is valid


def test_fp8_without_transformer_engine_is_a_machine_check():
    """validate.py accepts fp8 with transformer_impl=auto (the machine decides); the model
    builder refuses it with a message naming precision.fp8 where TE is not importable."""
    from avr_megatron.models.llama import transformer_engine_status, uses_transformer_engine

    cfg = load_config(RECIPES / "llama3_70b.yaml")
    ok, _ = transformer_engine_status()
    if ok:
        assert uses_transformer_engine(cfg)
    else:
        with pytest.raises(ConfigError, match=r"precision.fp8='hybrid' needs Transformer Engine"):
            uses_transformer_engine(cfg)


# --- memory arithmetic ------------------------------------------------------------------------

def _padded_vocab(m) -> int:
    return math.ceil(m.vocab_size / m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by


def llama_params_per_gpu(m, tp: int, pp: int) -> int:
    """Parameters held by one GPU of the largest pipeline stage, from the Llama architecture:
    per layer q/k/v/o projections and the SwiGLU gate/up/down matrices split over TP, two RMSNorm
    weights replicated; embedding (first stage) and untied output layer (last stage) split over
    TP; the final norm on the last stage."""
    h, head_dim = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    q, kv = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
    layer = (h * q + 2 * h * kv + q * h + 3 * h * m.ffn_hidden_size) // tp + 2 * h
    table = _padded_vocab(m) * h // tp
    layers = m.num_layers // pp
    first = layers * layer + table
    last = layers * layer + (0 if m.tie_word_embeddings else table) + h
    return layers * layer + (table if m.tie_word_embeddings else 2 * table) + h if pp == 1 \
        else max(first, last)


def memory_table(cfg) -> dict[str, float]:
    p, m, t, res = cfg.parallel, cfg.model, cfg.train, cfg.launch.slurm.train
    tp, pp, vp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.virtual_pipeline_model_parallel_size)
    dp = res.nodes * res.gpus_per_node // (tp * pp * p.context_parallel_size)
    params = llama_params_per_gpu(m, tp, pp)
    gib = 2 ** 30
    h, head_dim = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    tokens = t.seq_length * t.micro_batch_size
    if m.recompute_granularity == "full":  # each layer keeps only its bf16 input
        per_layer = tokens * h * 2 / tp
    else:  # bf16 tensors saved for backward: norm inputs/outputs, q k v, attention output,
        #     gate+up output, SwiGLU output (flash attention: no s x s scores)
        q, kv = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
        per_layer = tokens * (4 * h + 2 * q + 2 * kv + 3 * m.ffn_hidden_size) * 2 / tp
    in_flight = pp * (1 + (pp - 1) / (pp * vp)) if vp else pp
    weights, grads, optim = 2 * params / gib, 4 * params / gib, 12 * params / dp / gib
    acts = per_layer * (m.num_layers // pp) * in_flight / gib
    return {"params_per_gpu": params, "weights_gib": weights, "grads_gib": grads,
            "optimizer_gib": optim, "activations_gib": acts,
            "total_gib": weights + grads + optim + acts}


# The same numbers as the tables in the recipes' comments.
EXPECTED = {
    "llama3_8b.yaml": {"params_per_gpu": 4_015_263_744, "weights_gib": 7.48, "grads_gib": 14.96,
                       "optimizer_gib": 11.22, "activations_gib": 17.00, "total_gib": 50.66},
    "llama3_70b.yaml": {"params_per_gpu": 2_270_765_056, "weights_gib": 4.23, "grads_gib": 8.46,
                        "optimizer_gib": 12.69, "activations_gib": 1.44, "total_gib": 26.82},
}


def comment_table(path: Path) -> dict[str, float]:
    rows = re.findall(r"^#\s*\|\s*(\w+)[^|]*\|\s*([\d,.]+)\s*\|\s*$", path.read_text(), re.M)
    return {k: float(v.replace(",", "")) for k, v in rows}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_memory_arithmetic_in_comment(name):
    path = RECIPES / name
    computed = memory_table(load_config(path))
    assert computed["params_per_gpu"] == EXPECTED[name]["params_per_gpu"]
    for key, value in EXPECTED[name].items():
        assert computed[key] == pytest.approx(value, abs=0.006), key
    assert comment_table(path) == EXPECTED[name], f"{name}: the comment's table is out of date"
    assert computed["total_gib"] < 80 * 0.8, "leave room on an 80 GB H100"


def test_param_count_matches_the_published_totals():
    """The formula reproduces the known model sizes when nothing is split."""
    for preset, total in (("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496)):
        m = load_config(None, [f"model.preset={preset}"]).model
        assert llama_params_per_gpu(m, 1, 1) == total
