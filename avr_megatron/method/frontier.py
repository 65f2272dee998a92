"""Frontier batching: drive many state machines (one per prompt) to completion with two batch
callables, so every engine call carries the pending work of every prompt at once.

The callables are the only contact with engines: `generate(requests) -> [texts per request]`
and `score(requests) -> [reward per request]`. Generation runs whenever any is pending; scores
run when no generation is pending, so a driver that swaps the policy and the reward model on one
GPU swaps as rarely as the method allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from avr_megatron.method.machine import Machine
from avr_megatron.method.requests import GenerateRequest, Request, ScoreRequest, check_unique_keys

GenerateFn = Callable[[list[GenerateRequest]], Sequence[Sequence[str]]]
ScoreFn = Callable[[list[ScoreRequest]], Sequence[float]]


def run_frontier(machines: Sequence[Machine], generate: GenerateFn, score: ScoreFn) -> int:
    """Run until every machine is done; returns the number of engine calls made."""
    calls = 0
    while True:
        active = [m for m in machines if not m.done]
        if not active:
            return calls
        owner: dict[str, Machine] = {}
        requests: list[Request] = []
        for machine in active:
            for request in machine.pending():
                owner[request.key] = machine
                requests.append(request)
        check_unique_keys(requests)
        gens = [r for r in requests if isinstance(r, GenerateRequest)]
        batch: list[Request]
        outputs: list[Any]
        if gens:
            batch, outputs = list(gens), list(generate(gens))
        else:
            scores = [r for r in requests if isinstance(r, ScoreRequest)]
            if not scores:
                raise RuntimeError(f"{len(active)} machine(s) are not done but have nothing pending")
            batch, outputs = list(scores), list(score(scores))
        if len(outputs) != len(batch):
            raise ValueError(f"engine returned {len(outputs)} results for {len(batch)} requests")
        calls += 1
        per_machine: dict[int, tuple[Machine, dict[str, Any]]] = {}
        for request, output in zip(batch, outputs):
            machine = owner[request.key]
            per_machine.setdefault(id(machine), (machine, {}))[1][request.key] = output
        for machine, results in per_machine.values():
            machine.feed(results)
