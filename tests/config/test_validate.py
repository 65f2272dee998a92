"""Each bad recipe is rejected up front with a message that names the offending key."""

import pytest

from avr_megatron.config import ConfigError, load_config

TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"
VPP = "parallel.virtual_pipeline_model_parallel_size"

BAD = [
    (["model.preset=llama3.1-70b", f"{TP}=16"], "model.num_query_groups=8 is not divisible by "
     f"{TP}=16"),
    (["model.preset=llama3.2-3b", f"{TP}=16"], f"model.num_attention_heads=24 is not divisible by {TP}=16"),
    (["model.num_attention_heads=6", "model.num_query_groups=4"], "model.num_attention_heads=6 is "
     "not divisible by model.num_query_groups=4"),
    (["model.hidden_size=66"], "model.hidden_size=66 is not divisible"),
    (["model.preset=tiny", f"{PP}=4"], f"{PP}=4 is larger than model.num_layers=2"),
    (["model.num_layers=6", f"{PP}=4"], "model.num_layers=6 is not divisible by the number of "
     "pipeline chunks 4"),
    (["model.num_layers=8", f"{PP}=2", f"{VPP}=3"], "model.num_layers=8 is not divisible by the "
     "number of pipeline chunks 6"),
    ([f"{VPP}=2"], f"{VPP} needs {PP} >= 2"),
    (["model.ffn_hidden_size=130", f"{TP}=4"], f"model.ffn_hidden_size=130 is not divisible by {TP}"),
    (["model.make_vocab_size_divisible_by=100", f"{TP}=8"], "model.make_vocab_size_divisible_by"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs"),
    (["precision.fp8=e5m2"], "precision.fp8='e5m2' is not one of"),
    (["precision.fp8=e4m3", "model.transformer_impl=local"], "precision.fp8='e4m3' needs "
     "Transformer Engine"),
    (["precision.fp8_param=true"], "precision.fp8_param=true needs precision.fp8"),
    (["precision.fp8_recipe=fancy"], "precision.fp8_recipe='fancy'"),
    (["model.transformer_impl=te"], "model.transformer_impl='te' is not one of"),
    (["model.recompute_granularity=full"], "model.recompute_method=None is not one of"),
    (["model.recompute_method=block"], "model.recompute_method='block' needs"),
    (["model.rope_scaling.type=yarn"], "model.rope_scaling.type='yarn'"),
    (["model.num_layers=0"], "model.num_layers=0 must be >= 1"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10 is "
     "not divisible by train.micro_batch_size=4"),
    (["train.seq_length=4096", "model.max_position_embeddings=2048"], "train.seq_length=4096 "
     "exceeds model.max_position_embeddings=2048"),
    (["optimizer.min_lr=1.0", "optimizer.lr=0.1"], "optimizer.min_lr=1.0"),
    (["scheduler.decay_style=step"], "scheduler.decay_style='step'"),
    (["model.preset=tiny", f"{TP}=2", "parallel.sequence_parallel=true", "train.seq_length=33",
      "train.micro_batch_size=1"], "train.seq_length x train.micro_batch_size = 33 is not "
     f"divisible by {TP}=2"),
    (["ddp.overlap_param_gather=true", "optimizer.use_distributed_optimizer=false"],
     "ddp.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true"),
    (["model.num_layers=4", f"{PP}=2", f"{VPP}=2", "train.global_batch_size=3",
      "train.micro_batch_size=1"], "train.global_batch_size / train.micro_batch_size = 3 is not "
     "a multiple of 2"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_names_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_layers=0", "precision.fp8=bad"])
    assert "model.num_layers" in str(e.value) and "precision.fp8" in str(e.value)


@pytest.mark.parametrize("preset", ["tiny", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b",
                                    "llama3.1-70b"])
def test_presets_validate(preset):
    cfg = load_config(None, [f"model.preset={preset}"])
    assert cfg.model.preset == preset


def test_70b_layout_validates():
    cfg = load_config(None, ["model.preset=llama3.1-70b", f"{TP}=8", f"{PP}=4", f"{VPP}=5",
                             "parallel.sequence_parallel=true"])
    assert cfg.model.num_layers == 80


@pytest.mark.parametrize("override,key", [
    ("loss.beta=inf", "loss.beta"), ("loss.beta=-inf", "loss.beta"),
    ("optimizer.lr=nan", "optimizer.lr"), ("optimizer.adam_eps=.inf", "optimizer.adam_eps"),
    ("synth.sampling.temperature=nan", "synth.sampling.temperature"),
    ("eval.tie_margin=inf", "eval.tie_margin"), ("logging.peak_tflops=inf", "logging.peak_tflops"),
])
def test_non_finite_float_is_refused_naming_the_key_given(override, key):
    """No float key gives infinity a meaning, and NaN must not make a range rule blame another
    key (optimizer.lr=nan used to be reported as optimizer.min_lr)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    lines = [ln for ln in str(e.value).splitlines() if ln.strip().startswith("-")]
    assert len(lines) == 1 and f"{key}=" in lines[0] and "finite" in lines[0], str(e.value)


def test_interleaved_microbatches_per_data_parallel_rank():
    """The microbatch count per step and DP rank must be a multiple of PP under interleaving;
    the data-parallel size is known at run time (or from launch.slurm.train)."""
    from avr_megatron.config.layout import ParallelLayout
    from avr_megatron.training.setup import num_microbatches

    cfg = load_config(None, ["model.num_layers=4", f"{PP}=2", f"{VPP}=2",
                             "train.global_batch_size=6", "train.micro_batch_size=1"])
    assert num_microbatches(cfg, ParallelLayout(1, 2, 2, 1, 1, 2)) == 6
    with pytest.raises(ConfigError, match=r"data-parallel size 2\) = 3, to be a multiple of "
                                          f"{PP}=2"):
        num_microbatches(cfg, ParallelLayout(1, 2, 2, 1, 2, 4))


@pytest.mark.parametrize("recipe,cc,cuda,problem", [
    ("delayed", (9, 0), "12.8", None), ("tensorwise", (9, 0), "13.0", None),
    ("mxfp8", (9, 0), "13.0", "Blackwell"), ("mxfp8", (10, 0), "13.0", None),
    ("mxfp8", (12, 0), "13.0", "Blackwell"), ("blockwise", (9, 0), "12.8", "CUDA >= 12.9"),
    ("blockwise", (10, 0), "13.0", None), ("delayed", (8, 0), "13.0", ">= 8.9"),
    ("delayed", (8, 9), "12.0", "Ada"), ("delayed", (8, 9), "12.4", None),
])
def test_fp8_device_rules(recipe, cc, cuda, problem):
    from avr_megatron.config.validate import fp8_device_problem

    found = fp8_device_problem(recipe, cc, cuda)
    assert (found is None) if problem is None else (problem in found), found


def test_transformer_engine_rules_from_machine_facts():
    """model.transformer_impl and the settings that need TE, given what the machine offers
    (gathered by models/llama.uses_transformer_engine; here by hand, no torch)."""
    from avr_megatron.config.validate import GpuFacts, resolve_transformer_impl

    def use_te(overrides, usable, gpu=None):
        return resolve_transformer_impl(load_config(None, overrides), te_usable=usable,
                                        te_reason="no CUDA device", gpu=gpu)

    assert use_te([], True) is True and use_te([], False) is False
    assert use_te(["model.transformer_impl=local"], True) is False
    with pytest.raises(ConfigError, match="transformer_impl='transformer_engine' but no CUDA"):
        use_te(["model.transformer_impl=transformer_engine"], False)
    with pytest.raises(ConfigError, match="fp8='e4m3' needs Transformer Engine, but no CUDA"):
        use_te(["precision.bf16=true", "precision.fp8=e4m3"], False)
    with pytest.raises(ConfigError, match="context_parallel_size > 1 needs Transformer Engine"):
        use_te(["parallel.context_parallel_size=2"], False)
    h100 = GpuFacts((9, 0), "12.8", "H100")
    fp8 = ["precision.bf16=true", "precision.fp8=e4m3"]
    assert use_te([*fp8, "precision.fp8_recipe=delayed"], True, h100)
    with pytest.raises(ConfigError, match="fp8_recipe='mxfp8' on H100: mxfp8 needs a Blackwell"):
        use_te([*fp8, "precision.fp8_recipe=mxfp8"], True, h100)
    assert use_te([*fp8, "precision.fp8_recipe=mxfp8"], True, None)  # no GPU facts: not checked


def test_share_prompt_where_supported():
    """data.share_prompt: null = on for the local spec without pipeline parallelism; true where
    unsupported is an error naming why; false is always off."""
    from avr_megatron.config.validate import resolve_share_prompt

    def share(overrides, use_te):
        return resolve_share_prompt(load_config(None, overrides), use_te)

    assert share([], False) is True
    assert share([], True) is False
    assert share(["parallel.pipeline_model_parallel_size=2"], False) is False
    assert share(["data.share_prompt=false"], False) is False
    assert share(["data.share_prompt=true"], False) is True
    with pytest.raises(ConfigError, match="share_prompt=true is not supported here: Transformer"):
        share(["data.share_prompt=true"], True)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=2: pipeline stages"):
        share(["data.share_prompt=true", "parallel.pipeline_model_parallel_size=2"], False)
    # a GPU in bf16 without attention dropout keeps the one flash varlen call by default
    gpu = lambda o: resolve_share_prompt(load_config(None, o), False, on_gpu=True)  # noqa: E731
    assert gpu([]) is True  # fp32
    assert gpu(["precision.bf16=true"]) is False
    assert gpu(["precision.bf16=true", "model.attention_dropout=0.1"]) is True
    assert gpu(["precision.bf16=true", "data.share_prompt=true"]) is True


def test_sampling_and_filters_have_one_definition():
    """The recipe's sampling/filter sections take their defaults and rules from the method's
    SamplingParams / FilterConfig; errors name the recipe key without rewriting messages."""
    import dataclasses

    from avr_megatron.method.filters import FilterConfig
    from avr_megatron.method.requests import SamplingParams
    from avr_megatron.synth.passes import filters_of, sampling_of, thought_sampling_of

    cfg = load_config(None, ["run.seed=7", "synth.thoughts.max_tokens=99"])
    assert sampling_of(cfg) == SamplingParams(seed=7)
    assert thought_sampling_of(cfg) == SamplingParams(0.7, 0.8, 99, 7)
    assert filters_of(cfg) == FilterConfig()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["synth.thoughts.top_p=0", "eval.sampling.max_tokens=0",
                           "synth.filters.length_ratio=0", "synth.sampling.temperature=-1"])
    for text in ("synth.thoughts.top_p: expected a number in (0, 1]",
                 "eval.sampling.max_tokens: expected an integer >= 1",
                 "synth.filters.length_ratio: expected a positive number",
                 "synth.sampling.temperature: expected a number >= 0"):
        assert text in str(e.value), str(e.value)
    bad = dataclasses.replace(cfg.synth.thoughts, top_p=0)
    with pytest.raises(ValueError, match=r"^synth\.thoughts\.top_p"):
        SamplingParams.from_section(bad, 1, "synth.thoughts")
