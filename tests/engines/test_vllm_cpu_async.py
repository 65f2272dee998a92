"""Engine arguments from the recipe and vLLM's async engine against vllm-cpu (in .venv-vllm-cpu,
run by scripts/test_vllm_cpu; skipped where vllm is not importable).

- the engine argument names we read from vLLM's source are EngineArgs' fields, and the `vllm
  serve` flags we write parse back (vLLM's own parser) to the same engine arguments;
- recipe engine_args reach the engine, and on CPU chunked prefill is off by default, so a seeded
  frontier batch larger than vLLM's default token budget does not crash;
- the async engine (AsyncLLM) samples exactly what the offline engine (vllm.LLM) samples for the
  same seeds, and synthesis gives identical rows with and without phase barriers.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vllm_cpu

vllm = pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pathlib import Path  # noqa: E402

from avr_megatron.config import load_config  # noqa: E402
from avr_megatron.engines import engine_args as ea  # noqa: E402
from avr_megatron.method.requests import GenerateRequest, SamplingParams  # noqa: E402

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
TINY = REPO / "data" / "prompts" / "tiny_prompts.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from avr_megatron.testing.tiny_hf import make_tiny_vllm_models

    return make_tiny_vllm_models(tmp_path_factory.mktemp("models"))


def _cfg(run_dir, models, *extra):
    policy, reward = models
    return load_config(RECIPE, [f"run.dir={run_dir}", f"synth.input.path={TINY}", "synth.progress=false",
                                f"synth.policy.model={policy}", f"synth.reward.model={reward}",
                                "synth.policy.backend=vllm", "synth.reward.backend=vllm",
                                "synth.policy.max_model_len=1024", "synth.reward.max_model_len=1024",
                                "synth.policy.enforce_eager=true", "synth.reward.enforce_eager=true", *extra])


def test_argument_names_and_serve_flags_match_vllm(tmp_path, models):
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from avr_megatron.engines.serve import serve_command

    assert ea.names_from_source() == ea.names_from_vllm()
    cfg = _cfg(tmp_path, models, "synth.reward.backend=server", "synth.reward.base_url=http://127.0.0.1:8123",
               "synth.reward.engine_args.max_num_seqs=48", "synth.reward.engine_args.enable_prefix_caching=false",
               "synth.reward.dtype=float32")
    command = serve_command(cfg, "reward")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed, rest = parser.parse_known_args(command[3:])
    assert rest == ["--host", "127.0.0.1", "--port", "8123"]
    args = AsyncEngineArgs.from_cli_args(parsed)
    assert (args.model, args.max_num_seqs, args.enable_prefix_caching, args.dtype, args.runner,
            args.enable_chunked_prefill, args.max_model_len, args.enforce_eager, args.seed) == \
        (models[1], 48, False, "float32", "pooling", False, 1024, True, 1234)
    assert args.served_model_name in (models[1], [models[1]])


def _requests(n_requests: int, words: int, max_tokens: int) -> list[GenerateRequest]:
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=11)
    return [GenerateRequest(f"p{i}/g", [{"role": "user", "content": " ".join(["sky", "sea", "blue"][i % 3] for _ in
                                                                           range(words + i))}],
                            2, sampling.for_key(f"p{i}/g")) for i in range(n_requests)]


def test_async_engine_recipe_args_and_barrier_free_synthesis(tmp_path, models):
    from avr_megatron.engines.factory import build_chat_engine, build_reward_engine
    from avr_megatron.engines.vllm_offline import VllmChatEngine
    from avr_megatron.synth.driver import run_pass, pass_dir
    from avr_megatron.synth.store import read_output

    cfg = _cfg(tmp_path / "a", models, "synth.policy.engine_args.max_num_seqs=24", "synth.input.limit=8",
               "synth.chunk_size=3")
    # 40 seeded requests of ~150-token prompts: more prompt tokens than vLLM's default CPU budget
    # (4096), which with chunked prefill crashed ("CPU Generator does not use offset").
    big = _requests(40, 140, 8)
    chat = build_chat_engine(cfg.synth.policy, cfg.run.seed, asynchronous=True)
    try:
        sched = chat.engine.vllm_config.scheduler_config
        assert sched.max_num_seqs == 24 and not sched.enable_chunked_prefill
        assert chat.engine.vllm_config.cache_config.enable_prefix_caching
        assert chat.engine.vllm_config.cache_config.block_size == 32  # our CPU default (engine_args)
        got_big = chat.generate(big)
        futures = [chat.submit(r) for r in reversed(_requests(6, 5, 24))]
        got_small = [f.result() for f in futures][::-1]
    finally:
        chat.close()
    offline = VllmChatEngine(cfg.synth.policy.model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    try:
        assert offline.generate(big) == got_big
        assert offline.generate(_requests(6, 5, 24)) == got_small
    finally:
        offline.close()

    rows = {}
    chat = build_chat_engine(cfg.synth.policy, cfg.run.seed, asynchronous=True)
    reward = build_reward_engine(cfg.synth.reward, cfg.run.seed, asynchronous=True)
    try:
        for mode in ("barrier", "async"):
            run = _cfg(tmp_path / mode, models, "synth.input.limit=8", "synth.chunk_size=3", f"synth.scheduling={mode}")
            report = run_pass("stage1", run, engines=(chat, reward))
            assert report["this_run"]["scheduling"] == mode
            rows[mode] = read_output(pass_dir(run, "stage1"))
    finally:
        chat.close()
        reward.close()
    assert len(rows["async"]) == 8 and all(r["status"] == "ok" for r in rows["async"])
    assert rows["async"] == rows["barrier"]
