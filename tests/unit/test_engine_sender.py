"""The result sender: a result the platform refuses (400) never holds up the others."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.platform.retry import Backoff
from appliance.scan.sender import ResultSender
from appliance.state.spool import Spool


class ScriptedPlatform:
    """Answers PUTs: 400 for the host named in ``refuse``, 201 otherwise; records every call."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.calls: list[str] = []

    async def call(
        self, method: str, path: str, body: Any = None, *, what: str | None = None
    ) -> tuple[int, Any]:
        self.calls.append(path)
        if path.endswith("/" + self.refuse):
            return 400, {"error": "invalid_result", "message": "ports[0].port is not an integer"}
        return 201, {}


async def test_a_refused_result_waits_alone_and_stays_in_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.journal_job("j-1", {})
    spool.set_job_state("j-1", "running")
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        spool.put_result("j-1", host, {"host_key": host})
    platform = ScriptedPlatform(refuse="10.0.0.1")

    async def ended(*_: object) -> None:
        raise AssertionError("a 400 does not end the appliance's interest in the job")

    sender = ResultSender(
        spool,
        backoff=Backoff(base_s=0.01, cap_s=0.05),
        on_interest_ended=ended,
        is_live=lambda job_id: True,
    )
    sender.client = platform  # type: ignore[assignment]
    task = asyncio.create_task(sender.run())
    try:
        for _ in range(200):
            if sender.sent == 2:
                break
            await asyncio.sleep(0.01)
        sender.wake()
        await asyncio.sleep(0.2)  # several more rounds: the refused one must not be retried yet
    finally:
        task.cancel()
    assert sender.sent == 2
    assert [r.host_key for r in spool.unsent()] == ["10.0.0.1"]  # kept, not lost
    assert sum(c.endswith("/10.0.0.1") for c in platform.calls) == 1  # waits on its own schedule
    assert (
        "answered 400 invalid_result ports[0].port is not an integer; it stays in the spool"
        in caplog.text
    )
