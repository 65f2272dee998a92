"""vLLM engine arguments from the recipe (avr_megatron.engines.engine_args): checked against the
installed vLLM's names (here a stand-in vLLM source tree; the vllm_cpu tests use the real one),
our own keys refused with the key to use, nulls dropped, the CPU default, `vllm serve` flags."""

import sys
import textwrap
from types import SimpleNamespace

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.engines import engine_args as ea


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A vllm package whose engine/arg_utils.py defines EngineArgs (never imported: read only)."""
    root = tmp_path / "site"
    (root / "vllm" / "engine").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("raise ImportError('not importable in this test')\n")
    (root / "vllm" / "engine" / "arg_utils.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        @dataclass
        class EngineArgs:
            model: str = "m"
            max_num_seqs: int | None = None
            max_num_batched_tokens: int | None = None
            enable_prefix_caching: bool | None = None
            enable_chunked_prefill: bool | None = None
            dtype: str = "auto"
            seed: int = 0
            def helper(self) -> None:
                x: int = 1
    """))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    ea.names_from_source.cache_clear()
    yield
    ea.names_from_source.cache_clear()


def test_names_are_read_from_the_installed_source(fake_vllm):
    assert ea.names_from_source() == {"model", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                                      "enable_chunked_prefill", "dtype", "seed"}
    assert "vllm" not in sys.modules


def test_recipe_engine_args_are_validated_when_vllm_is_installed(fake_vllm):
    cfg = load_config(None, ["synth.policy.backend=vllm", "synth.policy.engine_args.max_num_seqs=512",
                             "synth.reward.backend=server", "synth.reward.engine_args.max_num_batched_tokens=8192"])
    assert cfg.synth.policy.engine_args == {"enable_prefix_caching": True, "max_num_seqs": 512}
    assert cfg.synth.reward.engine_args == {"max_num_batched_tokens": 8192}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["synth.policy.backend=vllm", "synth.policy.engine_args.max_num_seq=512",
                           "synth.policy.engine_args.dtype=bfloat16", "synth.policy.engine_args.seed=3",
                           "synth.reward.backend=vllm", "synth.reward.engine_args.runner=generate"])
    msg = str(e.value)
    assert "synth.policy.engine_args.max_num_seq: not an engine argument of the installed vLLM" in msg
    assert "did you mean max_num_seqs" in msg
    assert "synth.policy.engine_args.dtype: set synth.policy.dtype instead" in msg
    assert "synth.policy.engine_args.seed: not settable" in msg
    assert "synth.reward.engine_args.runner: not settable" in msg


def test_without_vllm_only_our_rules_apply(monkeypatch):
    monkeypatch.setattr(ea, "names_from_source", lambda: None)
    cfg = load_config(None, ["synth.policy.backend=vllm", "synth.policy.engine_args.anything_goes=1"])
    assert cfg.synth.policy.engine_args["anything_goes"] == 1
    with pytest.raises(ConfigError, match="set synth.policy.max_model_len instead"):
        load_config(None, ["synth.policy.backend=vllm", "synth.policy.engine_args.max_model_len=8"])
    # The transformers backend does not read engine_args: nothing to check.
    load_config(None, ["synth.policy.engine_args.max_model_len=8"])


def test_memory_shares_of_two_vllm_engines():
    cfg = load_config(None, ["synth.policy.backend=vllm", "synth.reward.backend=vllm"])
    assert cfg.synth.policy.gpu_memory_utilization + cfg.synth.reward.gpu_memory_utilization <= 0.9
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization = 1.2 > 1"):
        load_config(None, ["synth.policy.backend=vllm", "synth.reward.backend=vllm",
                           "synth.policy.gpu_memory_utilization=0.6", "synth.reward.gpu_memory_utilization=0.6"])


def test_engine_keywords(monkeypatch):
    monkeypatch.setattr(ea, "names_from_vllm", lambda: frozenset({"max_num_seqs", "enable_prefix_caching",
                                                                  "kv_cache_dtype"}))
    cfg = SimpleNamespace(tensor_parallel_size=2, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.5,
                          max_model_len=4096, engine_args={"max_num_seqs": 64, "enable_prefix_caching": None,
                                                           "kv_cache_dtype": "fp8"})
    kwargs = ea.vllm_kwargs(cfg, 7, "synth.policy")
    assert kwargs == dict(tensor_parallel_size=2, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.5,
                          seed=7, max_model_len=4096, max_num_seqs=64, kv_cache_dtype="fp8")
    cfg.engine_args = {"max_num_seq": 1}
    with pytest.raises(ConfigError, match="did you mean max_num_seqs"):
        ea.vllm_kwargs(cfg, 7, "synth.policy")
    # CPU builds: no chunked prefill and 32-token KV blocks unless asked for.
    assert ea.with_platform_defaults({"seed": 1}, cpu=True) == {"seed": 1, "enable_chunked_prefill": False,
                                                                 "block_size": 32}
    assert ea.with_platform_defaults({"enable_chunked_prefill": True, "block_size": 128}, cpu=True) == \
        {"enable_chunked_prefill": True, "block_size": 128}
    assert ea.with_platform_defaults({"seed": 1}, cpu=False) == {"seed": 1}


def test_serve_flags():
    flags = ea.serve_flags({"max_num_seqs": 512, "enable_prefix_caching": True, "enable_chunked_prefill": False,
                            "compilation_config": {"mode": 0}, "served_model_name": ["a", "b"], "quantization": None})
    assert flags == ["--max-num-seqs", "512", "--enable-prefix-caching", "--no-enable-chunked-prefill",
                     "--compilation-config", '{"mode": 0}', "--served-model-name", "a", "b"]


def test_serve_command_from_the_recipe(monkeypatch, capsys, tmp_path):
    from avr_megatron.cli.main import main
    from avr_megatron.engines.serve import serve_command

    monkeypatch.setattr(ea, "names_from_vllm", lambda: frozenset({"max_num_seqs", "enable_prefix_caching"}))
    monkeypatch.setattr(ea, "names_from_source", lambda: None)
    cfg = load_config(None, ["synth.reward.backend=server", "synth.reward.model=rm", "synth.reward.dtype=bfloat16",
                             "synth.reward.base_url=http://10.0.0.5:9001/v1", "synth.reward.engine_args.max_num_seqs=32",
                             "synth.policy.backend=server", "synth.policy.model=/models/policy"])
    cmd = serve_command(cfg, "reward", model="/models/rm", cpu=True)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = cmd[3:]
    assert args[:8] == ["--model", "/models/rm", "--served-model-name", "rm", "--host", "10.0.0.5", "--port", "9001"]
    flags = args[8:]
    for expected in (["--dtype", "bfloat16"], ["--max-num-seqs", "32"], ["--runner", "pooling"],
                     ["--no-enable-chunked-prefill"], ["--seed", "1234"]):
        i = flags.index(expected[0])
        assert flags[i:i + len(expected)] == expected
    policy = serve_command(cfg, "policy", cpu=False)
    assert policy[4:6] == ["/models/policy", "--served-model-name"] and "--enable-prefix-caching" in policy
    assert "--port" in policy and policy[policy.index("--port") + 1] == "8000"
    assert "--enable-chunked-prefill" not in " ".join(policy) and "--runner" not in policy
    monkeypatch.setattr(ea, "on_cpu", lambda: False)
    assert main(["synth", "serve", "--role", "policy", "--dry-run", f"run.dir={tmp_path}",
                 "synth.policy.model=/models/policy"]) == 0
    assert "vllm.entrypoints.openai.api_server --model /models/policy" in capsys.readouterr().out
