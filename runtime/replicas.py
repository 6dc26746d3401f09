"""Data-parallel replicas: several runners (each an engine on its own device group) behind the
Runner interface. A request goes to the replica with the fewest requests; a step steps every busy
replica. Replicas share nothing, so one never waits for another; their stats add up (`EngineStats`)."""

from __future__ import annotations

from xlaserve.runtime.request import Delta, FinishReason, Request
from xlaserve.runtime.runner import Runner
from xlaserve.runtime.stats import EngineStats


class Replicas:
    def __init__(self, runners: list[Runner]):
        self.runners = runners
        self._where: dict[str, Runner] = {}

    @property
    def scheduler(self):
        """Replica 0's scheduler: admission limits are the same on every replica."""
        return self.runners[0].scheduler

    @property
    def busy(self) -> bool:
        return any(r.busy for r in self.runners)

    @property
    def seqs(self) -> dict:
        return {k: v for r in self.runners for k, v in r.seqs.items()}

    def submit(self, req: Request) -> None:
        if req.request_id in self._where:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        runner = min(self.runners, key=lambda r: len(r.seqs))
        runner.submit(req)
        self._where[req.request_id] = runner

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Request | None:
        runner = self._where.pop(request_id, None)
        return None if runner is None else runner.cancel(request_id, reason)

    def step(self) -> list[Delta]:
        deltas = [d for r in self.runners if r.busy for d in r.step()]
        for d in deltas:
            if d.finished:
                self._where.pop(d.request.request_id, None)
        return deltas

    def stats(self) -> EngineStats:
        """Every replica's stats added up (`replicas` counts them)."""
        return EngineStats.total(r.stats() for r in self.runners)
