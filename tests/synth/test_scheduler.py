"""Scheduling without phase barriers (avr_megatron.synth.scheduler) against frontier batching: the
same rows for every stage, whatever order results arrive in, and no tree waits for another's slow
generation. Engines are deterministic fakes (each text and reward a pure function of the request
key, sample index and text), answering on pool threads after key-derived delays, so results come
back out of order."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest, key_prompt_id
from avr_megatron.method.stage1 import Stage1TreeBuilder
from avr_megatron.method.tree import Provenance
from avr_megatron.synth.driver import run_pass, scheduling_of, pass_dir
from avr_megatron.synth.scheduler import Job, run_async
from avr_megatron.synth.store import read_output

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
TINY = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
TEMPLATES = PromptTemplates()


def unit(*parts) -> float:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


class _Pool:
    def __init__(self, delay: float) -> None:
        self.delay, self.pool = delay, ThreadPoolExecutor(16)

    def later(self, key: str, fn, *args) -> Future:
        pause = self.delay * unit("delay", key)

        def run():
            time.sleep(pause)
            return fn(*args)

        return self.pool.submit(run)


class FakeChat:
    """Criticisms carry a [[n]] rating two times in three (so ratings are resampled), thoughts
    sometimes carry a final answer; `submit` answers after a random delay."""

    name = "fake-policy"

    def __init__(self, delay: float = 0.0) -> None:
        self.pool = _Pool(delay)
        self.submitted: list[str] = []
        self.stats = {"calls": 0}

    def sample(self, r: GenerateRequest, j: int) -> str:
        tag = f"{r.key}#{j}#{r.sampling.seed}"
        last = r.messages[-1]["content"]
        if last == TEMPLATES.criticise:
            if unit("norating", tag) < 1 / 3:
                return f"A review without a verdict ({tag})."
            return f"Review ({tag}). Rating: [[{1 + int(10 * unit('rating', tag))}]]"
        if unit("final", tag) < 0.5:
            return f"Thinking ({tag}).\n{TEMPLATES.thought_close}\n{TEMPLATES.final_answer_prefix} answer {tag}"
        return f"Answer ({tag})."

    def _one(self, r: GenerateRequest) -> list[str]:
        return [self.sample(r, j) for j in range(r.n)]

    def generate(self, requests):
        self.stats["calls"] += 1
        return [self._one(r) for r in requests]

    def submit(self, r: GenerateRequest) -> Future:
        self.submitted.append(r.key)
        return self.pool.later(r.key, self._one, r)

    def close(self) -> None:
        pass


class FakeReward:
    name = "fake-reward"

    def __init__(self, delay: float = 0.0) -> None:
        self.pool = _Pool(delay)
        self.stats = {"calls": 0}

    def _one(self, r: ScoreRequest) -> float:
        return round(6 * unit("reward", r.messages[-1]["content"]) - 3, 6)

    def score(self, requests):
        self.stats["calls"] += 1
        return [self._one(r) for r in requests]

    def submit(self, r: ScoreRequest) -> Future:
        return self.pool.later(r.key, self._one, r)

    def close(self) -> None:
        pass


def _cfg(run_dir, *extra):
    return load_config(RECIPE, [f"run.dir={run_dir}", f"synth.input.path={TINY}", "synth.input.limit=11",
                                "synth.chunk_size=3", "synth.progress=false", "synth.rating_fallback=false",
                                "synth.max_rating_tries=3", "synth.stage2.max_rounds=2",
                                "synth.policy.model=null", "synth.reward.model=null", *extra])


def _run_all(run_dir, scheduling, delay, *extra):
    cfg = _cfg(run_dir, f"synth.scheduling={scheduling}", *extra)
    reports = {kind: run_pass(kind, cfg, engines=(FakeChat(delay), FakeReward(delay)))
               for kind in ("stage1", "stage2", "thoughts")}
    return cfg, reports


def test_async_and_barrier_give_identical_rows(tmp_path):
    barrier, b_reports = _run_all(tmp_path / "barrier", "barrier", 0.0)
    runs = [_run_all(tmp_path / "async", "async", 0.01),
            _run_all(tmp_path / "async1", "async", 0.01, "synth.chunks_in_flight=1")]
    for kind in ("stage1", "stage2", "thoughts"):
        want = read_output(pass_dir(barrier, kind))
        assert want and all(r["status"] == "ok" for r in want)
        for cfg, reports in runs:
            assert read_output(pass_dir(cfg, kind)) == want, kind
            assert reports[kind]["this_run"]["scheduling"] == "async"
            assert reports[kind]["summary"] == b_reports[kind]["summary"]
        assert b_reports[kind]["this_run"]["scheduling"] == "barrier"
    # The rating resampling path ran (criticisms without a rating were asked again).
    assert b_reports["stage1"]["summary"]["events"].get("criticism_samples", 0) > 11 * 2


class _Bursts:
    """Holds every submitted request and answers them in bursts of random size and order (seeded):
    results reach the scheduler many at a time, several per tree, in groupings that change with
    timing, as on a loaded machine."""

    def __init__(self, seed: int) -> None:
        import random

        self.rng, self.lock, self.held = random.Random(seed), threading.Lock(), []
        self.stop, self.largest = threading.Event(), 0
        threading.Thread(target=self._release, daemon=True).start()

    def later(self, fn, *args) -> Future:
        future: Future = Future()
        with self.lock:
            self.held.append((future, fn, args))
        return future

    def _release(self) -> None:
        while not self.stop.wait(0.002):
            with self.lock:
                if not self.held:
                    continue
                self.rng.shuffle(self.held)
                cut = self.rng.randint(1, len(self.held))
                burst, self.held = self.held[:cut], self.held[cut:]
                self.largest = max(self.largest, cut)
            for future, fn, args in burst:
                future.set_result(fn(*args))


def test_async_rows_do_not_depend_on_how_results_are_grouped(tmp_path):
    barrier, _ = _run_all(tmp_path / "barrier", "barrier", 0.0)
    for seed in (1, 2):
        bursts = _Bursts(seed)
        chat, reward = FakeChat(), FakeReward()
        chat.submit = lambda r, c=chat: bursts.later(c._one, r)
        reward.submit = lambda r, rm=reward: bursts.later(rm._one, r)
        cfg = _cfg(tmp_path / f"bursts{seed}", "synth.scheduling=async")
        try:
            for kind in ("stage1", "stage2"):
                run_pass(kind, cfg, engines=(chat, reward))
                assert read_output(pass_dir(cfg, kind)) == read_output(pass_dir(barrier, kind)), (kind, seed)
            assert bursts.largest > 3  # many results did arrive together
        finally:
            bursts.stop.set()


def test_a_slow_generation_does_not_hold_back_other_trees():
    """Prompt p0's first criticism request is held until every other tree is finished; with
    frontier batching that would deadlock (its phase waits for it), here the others complete."""
    others_done = threading.Event()
    pool = ThreadPoolExecutor(8)
    chat = FakeChat()

    def submit_generate(r):
        if key_prompt_id(r.key) == "p0" and "crit" in r.key and not others_done.is_set():
            def held():
                assert others_done.wait(10), "the other trees did not finish while p0 was held"
                return chat._one(r)
            return pool.submit(held)
        return pool.submit(chat._one, r)

    reward = FakeReward()
    provenance = Provenance("p", "r", SamplingParams(seed=1))
    machines = [Stage1TreeBuilder(f"p{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}", k=2, m=2,
                                  provenance=provenance, templates=TEMPLATES, max_rating_tries=1)
                for i in range(6)]

    def watch():
        while not all(m.done for m in machines[1:]):
            time.sleep(0.01)
        others_done.set()

    threading.Thread(target=watch, daemon=True).start()
    submit_score = lambda r: pool.submit(reward._one, r)  # noqa: E731
    calls = run_async([Job("all", machines)], submit_generate, submit_score, on_done=lambda job: None, window=1)
    assert all(m.done for m in machines) and calls > 6


def test_async_needs_engines_that_take_single_requests(tmp_path):
    cfg = _cfg(tmp_path, "synth.scheduling=async")
    with pytest.raises(ConfigError, match="synth.scheduling=async needs engines"):
        scheduling_of(cfg)
    assert scheduling_of(_cfg(tmp_path)) == "barrier"  # transformers backends
    both = _cfg(tmp_path, "synth.policy.backend=vllm", "synth.reward.backend=server")
    assert scheduling_of(both) == "async"
    assert scheduling_of(_cfg(tmp_path, "synth.policy.backend=vllm", "synth.reward.backend=vllm",
                              "synth.scheduling=barrier")) == "barrier"
    assert scheduling_of(cfg, (FakeChat(), FakeReward())) == "async"


def test_engine_errors_surface(tmp_path):
    class Broken(FakeReward):
        def _one(self, r):
            raise RuntimeError("reward server down")

    cfg = _cfg(tmp_path, "synth.scheduling=async")
    with pytest.raises(RuntimeError, match="reward server down"):
        run_pass("stage1", cfg, engines=(FakeChat(), Broken()))
