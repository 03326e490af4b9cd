"""The inbox row's state machine on a real SQLite file: what an ack may change, what expiry, retention and
the gap query see."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.directory import Device
from appliance.store import Store
from appliance.store import devices as sql_devices
from appliance.store import escalations as sql_escalations
from appliance.store import messages as sql_messages
from tests.appliance.boxdata import BoxData, Clock


@pytest.fixture
def data(tmp_path: Path) -> Iterator[BoxData]:
    store = Store(tmp_path / "db.sqlite")
    try:
        yield BoxData(store, Clock())
    finally:
        store.close()


def _expire(data: BoxData, device: Device, mid: str) -> None:
    data.clock.advance(120)
    data.store.write_now(sql_messages.expire_batch, data.clock(), 100)


def _cancel(data: BoxData, device: Device, mid: str) -> None:
    data.store.write_now(sql_messages.cancel_message, data.app_id, mid, data.clock())


def _replace(data: BoxData, device: Device, mid: str) -> None:
    data.push_to(device, collapse_key="k")


def _drop(data: BoxData, device: Device, mid: str) -> None:
    data.store.write_now(sql_messages.drop_through, device.id, device.last_seq, data.clock())


def _unregister(data: BoxData, device: Device, mid: str) -> None:
    data.store.write_now(sql_devices.retire_device, device.id, "revoked", data.clock())


FINISHERS: dict[str, Callable[..., None]] = {
    "expired": _expire, "cancelled": _cancel, "replaced": _replace, "dropped": _drop, "unregistered": _unregister}


@pytest.mark.parametrize("finished", list(FINISHERS))
def test_an_ack_never_overwrites_a_finished_state_and_is_recorded_beside_it(data: BoxData, finished: str) -> None:
    device = data.device()
    mid = data.push_to(device, collapse_key="k")
    FINISHERS[finished](data, device, mid)
    assert data.delivery(device, mid) == (finished, None)
    data.ack(device, mid, "displayed")
    assert data.delivery(device, mid) == (finished, "displayed")


def test_an_ack_moves_a_pending_push_to_acked_and_only_ever_raises_its_rank(data: BoxData) -> None:
    device = data.device()
    mid = data.push_to(device)
    data.ack(device, mid, "opened")
    assert data.delivery(device, mid) == ("acked", "opened")
    data.ack(device, mid, "received")
    assert data.delivery(device, mid) == ("acked", "opened")


def test_expiry_works_in_bounded_batches(data: BoxData) -> None:
    devices = [data.device() for _ in range(5)]
    for _ in range(3):
        data.push_to(*devices, ttl_s=10)
    data.clock.advance(11)
    assert data.store.write_now(sql_messages.expire_batch, data.clock(), 4) == 4
    assert data.store.write_now(sql_messages.expire_batch, data.clock(), 100) == 11
    assert data.store.write_now(sql_messages.expire_batch, data.clock(), 100) == 0


def test_skipped_pushes_above_a_cursor_are_listed_with_their_reason_unless_acked(data: BoxData) -> None:
    device = data.device()
    expired = data.push_to(device, ttl_s=5)
    cancelled = data.push_to(device, ttl_s=600)
    replaced = data.push_to(device, ttl_s=600, collapse_key="shift")
    data.push_to(device, ttl_s=600, collapse_key="shift")  # seq 4 replaces seq 3, stays pending
    acked_then_cancelled = data.push_to(device, ttl_s=600)
    data.ack(device, acked_then_cancelled)
    data.store.write_now(sql_messages.cancel_message, data.app_id, cancelled, data.clock())
    data.store.write_now(sql_messages.cancel_message, data.app_id, acked_then_cancelled, data.clock())
    data.clock.advance(10)  # seq 1 outlived its TTL, the sweep has not run yet
    skipped = data.store.read_now(sql_messages.select_skipped, device.id, 0, data.clock(), 100)
    assert skipped == [(1, expired, "expired"), (2, cancelled, "cancelled"), (3, replaced, "replaced")]
    assert data.store.read_now(sql_messages.select_skipped, device.id, 2, data.clock(), 100) == [
        (3, replaced, "replaced")]


def test_retention_deletes_finished_rows_of_old_messages_and_keeps_pending_ones_and_the_seq(data: BoxData) -> None:
    device = data.device()
    acked = data.push_to(device, ttl_s=60)
    pending = data.push_to(device, ttl_s=10 * 86400)
    data.ack(device, acked)
    data.clock.advance(2 * 86400)
    recent = data.push_to(device, ttl_s=60)
    data.ack(device, recent)
    deleted = data.store.write_now(sql_messages.purge, data.clock() - 86400, 1)  # one row per batch
    assert deleted == 1
    assert data.count("SELECT count(*) FROM messages WHERE id = ?", acked) == 0
    assert data.delivery(device, pending) == ("queued", None)
    assert data.delivery(device, recent) == ("acked", "received")
    assert next(r["last_seq"] for r in data.store.read_now(sql_devices.select_active_devices)) == 3


def test_retention_keeps_a_message_its_inbox_rows_and_escalations_while_an_escalation_is_due(data: BoxData) -> None:
    device = data.device(phone="+4915112345678")
    mid = data.push_to(device, fallback={"after_s": 3 * 86400, "channels": ["sms"]})
    data.ack(device, mid)
    data.clock.advance(2 * 86400)
    data.store.write_now(sql_messages.purge, data.clock() - 86400)
    assert data.delivery(device, mid) == ("acked", "received")  # the escalation will see the ack
    assert data.count("SELECT count(*) FROM escalations WHERE message_id = ?", mid) == 1
    data.store.write_now(sql_escalations.set_state, (mid, device.id, "sms"), sql_escalations.SKIPPED, 0,
                         data.clock(), "acked", None, data.clock())
    data.store.write_now(sql_messages.purge, data.clock() - 86400)
    # Finished: the message goes, and its escalations with it.
    assert data.count("SELECT count(*) FROM messages WHERE id = ?", mid) == 0
    assert data.count("SELECT count(*) FROM escalations WHERE message_id = ?", mid) == 0
