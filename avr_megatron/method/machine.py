"""The request/result protocol shared by the tree builder and the search: a machine lists the
requests it waits on (`pending`), takes results for any subset of them (`feed`), and is `done`
when nothing more is needed. It never calls an engine, so a driver can batch across prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from avr_megatron.method.requests import Request, Result, check_result


class Machine(Protocol):
    """What a driver needs from a state machine (see avr_megatron.method.frontier)."""

    @property
    def done(self) -> bool: ...

    def pending(self) -> list[Request]: ...

    def feed(self, results: Mapping[str, Result]) -> None: ...


class RequestMachine:
    """Bookkeeping for outstanding requests. Subclasses `_issue` a request with a handler; `feed`
    validates every result first (all or nothing), then runs the handlers in key order, so the
    outcome depends only on the results, never on the order a driver happened to deliver them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._outstanding: dict[str, tuple[Request, Callable[[Any], None]]] = {}
        self._issued: set[str] = set()

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def pending(self) -> list[Request]:
        """The requests issued and not yet answered, in issue order (the same list until fed)."""
        return [request for request, _ in self._outstanding.values()]

    def feed(self, results: Mapping[str, Result]) -> None:
        if not isinstance(results, Mapping):
            raise ValueError(f"{self.name}: results: expected a mapping key -> result, got {type(results).__name__}")
        for key in results:
            if not isinstance(key, str) or key not in self._outstanding:
                raise ValueError(f"{self.name}: result for {key!r}: no such pending request (unknown key or already answered)")
        checked = [(key, check_result(self._outstanding[key][0], results[key])) for key in sorted(results)]
        for key, value in checked:
            _, handler = self._outstanding.pop(key)
            handler(value)

    def _issue(self, request: Request, handler: Callable[[Any], None]) -> None:
        if request.key in self._issued:
            raise RuntimeError(f"{self.name}: request key {request.key!r} issued twice")
        self._issued.add(request.key)
        self._outstanding[request.key] = (request, handler)
