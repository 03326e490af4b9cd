"""The escalator over a real store: at most once per (push, device, channel), never for an acked push, never
for a message retention removed, and a graceful stop that lets a send in flight finish. The transport is a
recording sender (the one-method seam `send`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.escalation import ChannelSettings, Escalator
from appliance.store import Store
from appliance.store import escalations as sql
from appliance.store import messages as sql_messages
from fallback.base import Notice, Receipt
from tests.appliance.boxdata import BoxData, Clock

PHONE = "+4915112345678"
SMS = {"sms": ChannelSettings(rate_per_min=6000, max_attempts=3, retry_initial_s=0.01, retry_max_s=0.01)}


@dataclass
class RecordingSender:
    """Records every notice; `hold` makes a send wait until the test releases it."""

    sent: list[Any]
    hold: asyncio.Event | None = None
    started: asyncio.Event | None = None

    async def send(self, notice: Any) -> Receipt:
        if self.started is not None:
            self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        self.sent.append(notice)
        return Receipt(transport="recording", message_ids=(f"r{len(self.sent)}",), parts=1)

    async def aclose(self) -> None:
        pass


def escalation(data: BoxData, mid: str, device_id: int) -> dict[str, Any]:
    state, reason, attempts = data.store.read_now(lambda conn: conn.execute(
        "SELECT state, reason, attempts FROM escalations WHERE message_id = ? AND device = ?",
        (mid, device_id)).fetchone())
    return {"state": sql.STATE_NAMES[state], "reason": reason, "attempts": attempts}


def run(tmp_path: Path, build: Callable[[BoxData], Any],
        scenario: Callable[[Escalator, BoxData, Any, RecordingSender], Any], sender: RecordingSender | None = None,
        start: bool = True) -> BoxData:
    store = Store(tmp_path / "db.sqlite")
    data = BoxData(store, Clock())
    built = build(data)
    sender = sender or RecordingSender([])

    async def main() -> None:
        store.start()
        escalator = Escalator(store, {"sms": sender}, SMS, Notice, clock=data.clock)
        try:
            if start:
                await escalator.start()
            await scenario(escalator, data, built, sender)
        finally:
            await escalator.close(timeout_s=5)

    try:
        asyncio.run(main())
    finally:
        store.close()
    return data


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def due_push(data: BoxData, after_s: float = 1, **kw: Any) -> tuple[int, str]:
    device = data.device(phone=PHONE)
    return device.id, data.push_to(device, fallback={"after_s": after_s, "channels": ["sms"]}, **kw)


def test_an_unacknowledged_push_goes_out_once_when_due(tmp_path: Path) -> None:
    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        device, mid = built
        await asyncio.sleep(0.1)
        assert sender.sent == []  # not due yet
        data.clock.advance(2)
        escalator.poke()
        await until(lambda: escalator.counters["sent"] == 1)
        await asyncio.sleep(0.2)
        assert [(n.to, n.text) for n in sender.sent] == [(PHONE, "Alarm: Hall B")]
        assert escalation(data, mid, device) == {"state": "sent", "reason": None, "attempts": 1}

    run(tmp_path, due_push, scenario)


def test_an_acked_push_is_never_escalated_even_when_retention_removed_its_inbox_row(tmp_path: Path) -> None:
    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        device, mid = built
        # What the old purge did: an acked inbox row deleted while its escalation still waited.
        await data.store.write(lambda conn: conn.execute("DELETE FROM deliveries WHERE message_id = ?", (mid,)))
        data.clock.advance(2)
        await escalator.start()
        await until(lambda: escalation(data, mid, device)["state"] != "pending")
        assert sender.sent == []
        assert escalation(data, mid, device) == {"state": "skipped", "reason": "purged", "attempts": 0}

    def build(data: BoxData) -> tuple[int, str]:
        device, mid = due_push(data)
        data.store.write_now(sql_messages.mark_acked, [], [(1, data.clock(), mid, device, 1)])
        return device, mid

    run(tmp_path, build, scenario, start=False)


def test_an_escalation_whose_message_is_gone_is_finished_not_selected_again(tmp_path: Path) -> None:
    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        device, mid = built
        await data.store.write(lambda conn: conn.execute("DELETE FROM messages WHERE id = ?", (mid,)))
        data.clock.advance(2)
        await escalator.start()
        await until(lambda: escalation(data, mid, device)["state"] != "pending")
        assert escalation(data, mid, device) == {"state": "skipped", "reason": "purged", "attempts": 0}
        assert await data.store.read(sql.select_due, data.clock(), 10) == []
        assert sender.sent == []

    run(tmp_path, due_push, scenario, start=False)


def test_an_ack_recorded_beside_an_expired_state_stops_an_even_if_expired_fallback(tmp_path: Path) -> None:
    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        device, mid = built
        data.clock.advance(10)
        await data.store.write(sql_messages.expire_batch, data.clock(), 100)
        await data.store.write(sql_messages.mark_acked, [], [(1, data.clock(), mid, device, 1)])
        await escalator.start()
        await until(lambda: escalation(data, mid, device)["state"] != "pending")
        assert escalation(data, mid, device)["reason"] == "acked"
        assert sender.sent == []

    def build(data: BoxData) -> tuple[int, str]:
        device = data.device(phone=PHONE)
        mid = data.push_to(device, ttl_s=5, fallback={"after_s": 8, "channels": ["sms"], "even_if_expired": True})
        return device.id, mid

    run(tmp_path, build, scenario, start=False)


def test_a_graceful_stop_lets_a_send_in_flight_finish_and_records_it_sent(tmp_path: Path) -> None:
    hold, started = asyncio.Event(), asyncio.Event()
    sender = RecordingSender([], hold, started)

    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        data.clock.advance(2)
        escalator.poke()
        await asyncio.wait_for(started.wait(), 5)
        closing = asyncio.ensure_future(escalator.close(timeout_s=5))
        await asyncio.sleep(0.2)
        assert not closing.done()  # waiting for the send, not cancelling it
        hold.set()
        await closing

    data = run(tmp_path, due_push, scenario, sender=sender)
    assert len(sender.sent) == 1
    assert escalation_on_disk(data.store.path) == ("sent", None)


def test_a_send_that_outlives_the_stop_timeout_is_interrupted_and_never_repeated(tmp_path: Path) -> None:
    hold, started = asyncio.Event(), asyncio.Event()
    sender = RecordingSender([], hold, started)

    async def scenario(escalator: Escalator, data: BoxData, built: tuple[int, str], sender: RecordingSender) -> None:
        data.clock.advance(2)
        escalator.poke()
        await asyncio.wait_for(started.wait(), 5)
        await escalator.close(timeout_s=0.1)

    data = run(tmp_path, due_push, scenario, sender=sender)
    assert escalation_on_disk(data.store.path) == ("sending", None)
    again = RecordingSender([])
    restart_escalator(data.store.path, again)
    assert sender.sent == [] and again.sent == []
    assert escalation_on_disk(data.store.path) == ("failed", "interrupted")


def escalation_on_disk(path: Path) -> tuple[str, str | None]:
    store = Store(path)
    try:
        state, reason = store.read_now(lambda conn: conn.execute("SELECT state, reason FROM escalations").fetchone())
    finally:
        store.close()
    return sql.STATE_NAMES[state], reason


def restart_escalator(path: Path, sender: RecordingSender) -> None:
    """Start an escalator on an existing database file, give it time to scan, stop it."""
    store = Store(path)

    async def main() -> None:
        store.start()
        escalator = Escalator(store, {"sms": sender}, SMS, Notice, clock=Clock(2e9))
        await escalator.start()
        await asyncio.sleep(0.3)
        await escalator.close(timeout_s=1)

    try:
        asyncio.run(main())
    finally:
        store.close()
