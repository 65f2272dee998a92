"""vLLM's async engine (`AsyncLLM`) in this process: requests go in one at a time, each as soon as
the method issues it, and each comes back as soon as its own generation ends, so synthesis has no
phase barriers (avr_megatron.synth.scheduler): while one tree waits on a long improvement, the
engine keeps generating for every other tree.

The engine and its asyncio event loop live in one daemon thread; `submit` hands a request over and
returns a `concurrent.futures.Future`. Prompts, sampling parameters, EOS handling, decoding and
the reward read-out are those of the offline engines (subclassed), so a request gives the same
tokens here as through `vllm.LLM` with the same seed. `generate` / `score` (whole batches) work
too: submit all, wait for all.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any

from avr_megatron.engines.engine_args import with_platform_defaults
from avr_megatron.engines.vllm_offline import VllmChatEngine, VllmRewardEngine, reward_kwargs
from avr_megatron.method.requests import GenerateRequest, ScoreRequest


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


def _start(model: str, kwargs: dict[str, Any]) -> tuple[_LoopThread, Any]:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = _LoopThread(f"avr-vllm-{model}")

    async def build():
        # Built inside the loop so vLLM's output handler runs there.
        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kwargs))

    try:
        return loop, loop.submit(build()).result()
    except BaseException:
        loop.close()
        raise


class _AsyncEngine:
    """What both async engines share: an AsyncLLM on its own loop thread, request ids, shutdown and
    the prefix-cache reset. Listed first in the bases so it replaces the offline engine's versions."""

    def _start_async(self, model: str, name: str, kwargs: dict[str, Any]) -> None:
        self.name = name
        self._loop, self.engine = _start(model, kwargs)
        self._setup(self.engine.get_tokenizer(), self.engine.model_config)
        self._ids = itertools.count()

    def close(self) -> None:
        async def stop():  # in the loop's thread: shutdown cancels the engine's asyncio tasks
            self.engine.shutdown()

        try:
            self._loop.submit(stop()).result(timeout=300)
        finally:
            self._loop.close()

    def reset_prefix_cache(self) -> None:
        self._loop.submit(self.engine.reset_prefix_cache()).result()


class AsyncVllmChatEngine(_AsyncEngine, VllmChatEngine):
    def __init__(self, model: str, *, name: str | None = None, **engine_kwargs: Any) -> None:
        name = name or str(model)
        self._start_async(model, name, with_platform_defaults(engine_kwargs, f"policy {name!r}"))

    def submit(self, request: GenerateRequest) -> Future:
        """A future of the request's n reply texts."""
        return self._loop.submit(self._texts(request))

    async def _texts(self, request: GenerateRequest) -> list[str]:
        return self._decode(await self._run(request))

    async def _run(self, request: GenerateRequest) -> list[list[int]]:
        # Everything that touches self.stats runs in the loop thread.
        from vllm.sampling_params import RequestOutputKind

        self.stats["requests"] += 1
        self.stats["samples"] += request.n
        prepared = self._prepare(request)
        if prepared is None:
            return [[] for _ in range(request.n)]
        prompt, params = prepared
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for output in self.engine.generate(prompt, params, request_id=f"{next(self._ids)}:{request.key}"):
            final = output
        return self._token_ids(request, final)

    def generate_token_ids(self, requests: Sequence[GenerateRequest]) -> list[list[list[int]]]:
        futures = [self._loop.submit(self._run(r)) for r in requests]
        self.stats["calls"] += 1
        return [f.result() for f in futures]


class AsyncVllmRewardEngine(_AsyncEngine, VllmRewardEngine):
    def __init__(self, model: str, *, name: str | None = None, **engine_kwargs: Any) -> None:
        name = name or str(model)
        self._start_async(model, name, reward_kwargs(engine_kwargs, name))

    def submit(self, request: ScoreRequest) -> Future:
        """A future of the request's raw reward."""
        return self._loop.submit(self._run(request))

    async def _run(self, request: ScoreRequest) -> float:
        from vllm import PoolingParams

        prompt = self._prepare(request)
        final = None
        params = PoolingParams(task="classify", use_activation=False)
        async for output in self.engine.encode(prompt, params, request_id=f"{next(self._ids)}:{request.key}"):
            final = output
        self.stats["requests"] += 1
        return self._score(request, final)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        futures = [self.submit(r) for r in requests]
        scores = [f.result() for f in futures]
        self.stats["calls"] += 1
        return scores
