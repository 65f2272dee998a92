"""Synthesis without phase barriers: every request goes to its engine the moment its machine issues
it, and every machine is fed the moment one of its results returns.

Frontier batching (avr_megatron.method.frontier) advances all prompts of a chunk in lockstep:
each phase (criticisms, improvements, scores) waits for its slowest generation, so with real
length spreads the engine idles while a few long replies finish. Here the engines (vLLM's async
engine, or a server with many requests in flight) keep everything issued so far in flight and
batch it themselves; a tree whose improvement returns early asks for its scores at once. Several
chunks (`window`) are in flight too, so a chunk boundary is no barrier either.

Outputs are the same as with frontier batching: each request carries its own seed (so its
samples do not depend on what else is in flight), and a machine's state depends only on the
results it is fed, never on their order (avr_megatron.method.machine). Results that arrive
together are fed in key order.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from avr_megatron.method.machine import Machine
from avr_megatron.method.requests import GenerateRequest, Request, ScoreRequest

SubmitGenerate = Callable[[GenerateRequest], Future]
SubmitScore = Callable[[ScoreRequest], Future]


@dataclass
class Job:
    """One chunk: its machines, what happens to generated texts before a machine sees them
    (`postprocess(requests, texts)`, e.g. the rating fallback's counter), and whatever the caller
    needs back in `on_done` (`context`)."""

    key: Any
    machines: Sequence[Machine]
    postprocess: Callable[[list[GenerateRequest], list[list[str]]], list[list[str]]] | None = None
    context: Any = None
    open: int = field(default=0, init=False)


def run_async(jobs: Iterable[Job], submit_generate: SubmitGenerate, submit_score: SubmitScore, *,
              on_done: Callable[[Job], None], window: int = 2) -> int:
    """Run every job's machines to completion with at most `window` jobs in flight; `on_done(job)`
    runs (in this thread) as soon as all machines of a job are done. Returns the number of
    requests sent. An engine error is raised here; requests still in flight are cancelled."""
    if window < 1:
        raise ValueError(f"window: expected >= 1, got {window}")
    finished: queue.SimpleQueue = queue.SimpleQueue()
    inflight: dict[Future, tuple[Request, Machine, Job]] = {}
    sent: set[str] = set()
    todo = iter(jobs)
    running: list[Job] = []

    def send(job: Job, machines: Iterable[Machine]) -> None:
        for machine in machines:
            for request in machine.pending():
                if request.key in sent:
                    continue
                sent.add(request.key)
                submit = submit_generate if isinstance(request, GenerateRequest) else submit_score
                future = submit(request)
                inflight[future] = (request, machine, job)
                future.add_done_callback(finished.put)

    def settle(job: Job) -> None:
        job.open = sum(not m.done for m in job.machines)
        if job.open == 0:
            running.remove(job)
            on_done(job)

    def refill() -> None:
        while len(running) < window:
            job = next(todo, None)
            if job is None:
                return
            running.append(job)
            send(job, job.machines)
            settle(job)

    try:
        refill()
        while inflight:
            done = [finished.get()]
            while True:  # everything that finished meanwhile, fed together
                try:
                    done.append(finished.get_nowait())
                except queue.Empty:
                    break
            fed: dict[int, tuple[Machine, Job, dict[str, Any]]] = {}
            for future in sorted(done, key=lambda f: inflight[f][0].key):
                request, machine, job = inflight.pop(future)
                result = future.result()
                if isinstance(request, GenerateRequest) and job.postprocess is not None:
                    result = job.postprocess([request], [list(result)])[0]
                fed.setdefault(id(machine), (machine, job, {}))[2][request.key] = result
            touched: dict[int, Job] = {}
            for machine, job, results in fed.values():
                machine.feed(results)
                send(job, [machine])
                touched[id(job)] = job
            for job in touched.values():
                settle(job)
            refill()
    except BaseException:
        for future in inflight:
            future.cancel()
        raise
    stuck = [job.key for job in running if any(not m.done for m in job.machines)]
    if stuck:
        raise RuntimeError(f"chunk(s) {stuck}: machines are not done but have nothing pending")
    return len(sent)
