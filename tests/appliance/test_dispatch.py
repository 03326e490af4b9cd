"""The dispatcher over a real store: delivery, catch-up with resync and gap notices, acks confirmed only after
their commit, maintenance in bounded batches, the bounds on what one device may ask (#10). The broker side is a recording link (the one seam it needs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import dispatch
from appliance.dispatch import DeviceLimits, Dispatcher
from appliance.directory import Device
from appliance.store import Store
from appliance.store import messages as sql_messages
from tests.appliance.boxdata import BoxData, Clock


class RecordingLink:
    """A device connection that records what the box sends it."""

    def __init__(self, device: Device) -> None:
        self.client_id = device.client_id
        self.principal = device
        self.closed = False
        self.subscribed = True
        self.sent: list[dict[str, Any]] = []

    def send_push(self, payload: bytes) -> bool:
        self.sent.append(json.loads(payload))
        return True

    def close(self, reason: str, abort: bool = False) -> None:
        self.closed = True

    def pushes(self) -> list[int]:
        return [doc["seq"] for doc in self.sent if "seq" in doc]

    def notices(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.sent if doc.get("type") == kind]


def run_with_store(tmp_path: Path, build: Callable[[BoxData], Any],
                   scenario: Callable[[Dispatcher, BoxData, Any], Any], limits: DeviceLimits | None = None,
                   monotonic: Clock | None = None) -> None:
    """Build data on the stopped store, then run `scenario` with the writer running and a dispatcher."""
    store = Store(tmp_path / "db.sqlite")
    data = BoxData(store, Clock())
    built = build(data)

    async def main() -> None:
        store.start()
        dispatcher = Dispatcher(store, data.directory, inbox_limit=1000, clock=data.clock, limits=limits,
                                monotonic=monotonic or Clock(0.0))
        try:
            await scenario(dispatcher, data, built)
        finally:
            await dispatcher.close()

    try:
        asyncio.run(main())
    finally:
        store.close()


async def settle(dispatcher: Dispatcher, rounds: int = 3) -> None:
    """Let the flush timer fire and the group commit land."""
    for _ in range(rounds):
        await asyncio.sleep(0.05)
        await dispatcher.store.write(lambda conn: None)


def connect(dispatcher: Dispatcher, device: Device) -> RecordingLink:
    link = RecordingLink(device)
    dispatcher.handle_connected(link)  # type: ignore[arg-type]
    return link


def test_hello_catches_up_then_a_new_push_goes_out_live_and_its_ack_is_stored(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert link.pushes() == [1, 2]
        accepted = dispatcher.prepare(data.app_id, {"title": "t"}, [device], 60, {})
        await dispatcher.submit([accepted])
        assert link.pushes() == [1, 2, 3]
        dispatcher.handle_publish(link, "ack", json.dumps({"ids": [accepted.message["id"]]}).encode())  # type: ignore[arg-type]
        await settle(dispatcher)
        assert data.delivery(device, accepted.message["id"]) == ("acked", "received")

    def build(data: BoxData) -> Device:
        device = data.device()
        data.push_to(device)
        data.push_to(device)
        return device

    run_with_store(tmp_path, build, scenario)


def test_a_confirmed_ack_is_committed_before_its_confirmation_runs(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, str]) -> None:
        device, mid = built
        link = connect(dispatcher, device)
        confirmed: list[tuple[str, str | None]] = []
        dispatcher.handle_ack(link, json.dumps({"ids": [mid]}).encode(),  # type: ignore[arg-type]
                              lambda: confirmed.append(data.delivery(device, mid)))
        assert confirmed == []  # not before the commit
        await settle(dispatcher)
        assert confirmed == [("acked", "received")]  # and the row was acked when it ran

    def build(data: BoxData) -> tuple[Device, str]:
        device = data.device()
        return device, data.push_to(device)

    run_with_store(tmp_path, build, scenario)


def test_an_ack_asking_for_a_receipt_gets_one_after_its_commit(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, str]) -> None:
        device, mid = built
        link = connect(dispatcher, device)
        ack = {"ids": [mid, "not-an-id"], "state": "opened", "receipt": True}
        dispatcher.handle_publish(link, "ack", json.dumps(ack).encode())  # type: ignore[arg-type]
        assert link.notices("ack_receipt") == []
        await settle(dispatcher)
        assert link.notices("ack_receipt") == [{"type": "ack_receipt", "ids": [mid], "state": "opened"}]
        assert data.delivery(device, mid) == ("acked", "opened")

    def build(data: BoxData) -> tuple[Device, str]:
        device = data.device()
        return device, data.push_to(device)

    run_with_store(tmp_path, build, scenario)


def test_a_malformed_confirmed_ack_is_confirmed_at_once_and_records_nothing(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        link = connect(dispatcher, device)
        confirmed: list[bool] = []
        dispatcher.handle_ack(link, b'{"ids": "x"}', lambda: confirmed.append(True))  # type: ignore[arg-type]
        dispatcher.handle_ack(link, b"not json", lambda: confirmed.append(True))  # type: ignore[arg-type]
        assert confirmed == [True, True]

    run_with_store(tmp_path, lambda data: data.device(), scenario)


def test_catch_up_tells_the_device_of_expired_cancelled_and_replaced_pushes_it_will_never_get(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, list[str]]) -> None:
        device, (expired, cancelled, replaced) = built
        data.clock.advance(10)  # the 5-second push expired while the device was away
        await dispatcher.sweep()
        await dispatcher.store.write(sql_messages.cancel_message, data.app_id, cancelled, data.clock())
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        await settle(dispatcher)
        [gap] = link.notices("gap")
        assert gap["skipped"] == [{"seq": 1, "id": expired, "reason": "expired"},
                                  {"seq": 2, "id": cancelled, "reason": "cancelled"},
                                  {"seq": 3, "id": replaced, "reason": "replaced"}]
        assert link.sent.index(gap) == 0 and link.pushes() == [4]  # the notice comes before the pushes
        link.sent.clear()
        dispatcher.handle_publish(link, "hello", b'{"cursor": 2}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert [n["skipped"] for n in link.notices("gap")] == [[{"seq": 3, "id": replaced, "reason": "replaced"}]]

    def build(data: BoxData) -> tuple[Device, list[str]]:
        device = data.device()
        mids = [data.push_to(device, ttl_s=5), data.push_to(device, ttl_s=600),
                data.push_to(device, ttl_s=600, collapse_key="k")]
        data.push_to(device, ttl_s=600, collapse_key="k")
        return device, mids

    run_with_store(tmp_path, build, scenario)


def test_a_resync_covers_what_it_dropped_and_the_gap_notice_lists_only_what_lies_above(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, str]) -> None:
        device, cancelled = built
        dispatcher.inbox_limit = 3
        data.clock.advance(10)
        await dispatcher.store.write(sql_messages.cancel_message, data.app_id, cancelled, data.clock())
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert link.sent[0] == {"type": "resync", "through": 3}
        assert link.sent[1] == {"type": "gap", "skipped": [{"seq": 7, "id": cancelled, "reason": "cancelled"}]}
        assert link.pushes() == [4, 5, 6]

    def build(data: BoxData) -> tuple[Device, str]:
        device = data.device()
        data.push_to(device, ttl_s=5)  # seq 1 expires, below what the resync covers
        for _ in range(5):
            data.push_to(device, ttl_s=600)  # seqs 2-6: one more than the inbox holds, plus seq 7
        return device, data.push_to(device, ttl_s=600)

    run_with_store(tmp_path, build, scenario)


def test_gap_notices_come_in_bounded_pieces(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatch, "MAX_GAP_ENTRIES", 2)

    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        data.clock.advance(10)
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert [[s["seq"] for s in n["skipped"]] for n in link.notices("gap")] == [[1, 2], [3, 4], [5]]

    def build(data: BoxData) -> Device:
        device = data.device()
        for _ in range(5):
            data.push_to(device, ttl_s=5)
        return device

    run_with_store(tmp_path, build, scenario)


def test_sweep_expires_in_batches_and_trims_overfull_inboxes(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatch, "EXPIRY_BATCH", 3)

    async def scenario(dispatcher: Dispatcher, data: BoxData, devices: list[Device]) -> None:
        dispatcher.inbox_limit = 2
        commits = dispatcher.store.commits
        data.clock.advance(10)
        await dispatcher.sweep()
        assert dispatcher.counters["expired"] == 8  # 4 pushes to 2 devices
        assert dispatcher.store.commits - commits >= 3  # in batches of 3 rows, each its own write
        assert data.count("SELECT count(*) FROM deliveries WHERE state = 3") == 8
        assert [d.dropped_through for d in devices] == [5, 5]  # 3 pending left each: the oldest dropped

    def build(data: BoxData) -> list[Device]:
        devices = [data.device(), data.device()]
        for _ in range(4):
            data.push_to(*devices, ttl_s=5)
        for _ in range(3):
            data.push_to(*devices, ttl_s=600)
        return devices

    run_with_store(tmp_path, build, scenario)


def test_a_push_is_not_held_behind_a_whole_retention_purge(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatch, "MAINTENANCE_BATCH", 50)

    async def scenario(dispatcher: Dispatcher, data: BoxData, devices: list[Device]) -> None:
        purge = asyncio.ensure_future(dispatcher.purge(data.clock() - 3600))
        await asyncio.sleep(0)  # the first batch is queued
        accepted = dispatcher.prepare(data.app_id, {"title": "new"}, [devices[0]], 60, {})
        await dispatcher.submit([accepted])
        assert not purge.done()  # the push committed between two batches, not after the whole purge
        assert await purge == 1000
        assert data.count("SELECT count(*) FROM deliveries") == 1

    def build(data: BoxData) -> list[Device]:
        devices = [data.device() for _ in range(10)]
        for _ in range(100):
            mid_of = data.push_to(*devices)
            data.store.write_now(sql_messages.mark_acked, [], [(1, data.clock(), mid_of, d.id, 1) for d in devices])
        data.clock.advance(2 * 3600)
        return devices

    run_with_store(tmp_path, build, scenario)


# -- bounds on one device (#10) ---------------------------------------------------------------------------

def test_ids_beyond_the_cap_in_one_ack_are_ignored_and_their_pushes_stay_pending(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, list[str]]) -> None:
        device, mids = built
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "ack", json.dumps({"ids": mids}).encode())  # type: ignore[arg-type]
        await settle(dispatcher)
        assert [data.delivery(device, mid)[0] for mid in mids] == ["acked", "acked", "queued"]
        assert dispatcher.counters["ack_ids_ignored"] == 1 and dispatcher.counters["acked"] == 2

    def build(data: BoxData) -> tuple[Device, list[str]]:
        device = data.device()
        return device, [data.push_to(device) for _ in range(3)]

    run_with_store(tmp_path, build, scenario, limits=DeviceLimits(ack_ids_max=2))


def test_acked_ids_of_another_device_are_dropped_and_counted_never_as_acks(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, Device, str, str]) -> None:
        forger, victim, theirs, mine = built
        link = connect(dispatcher, forger)
        future_id = dispatch.new_message_id(data.clock() + 86400)
        ack = {"ids": [theirs, future_id, "junk", 7, mine], "state": "opened"}
        dispatcher.handle_publish(link, "ack", json.dumps(ack).encode())  # type: ignore[arg-type]
        await settle(dispatcher)
        assert data.delivery(victim, theirs) == ("queued", None)  # the victim's push is untouched
        assert data.delivery(forger, mine) == ("acked", "opened")
        assert dispatcher.counters["acked"] == 1
        assert dispatcher.counters["ack_ids_bogus"] == 4

    def build(data: BoxData) -> tuple[Device, Device, str, str]:
        forger, victim = data.device(), data.device()
        return forger, victim, data.push_to(victim), data.push_to(forger)

    run_with_store(tmp_path, build, scenario)


def test_a_device_over_its_message_rate_has_the_excess_dropped_then_is_disconnected(tmp_path: Path) -> None:
    ticks = Clock(0.0)

    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, list[str]]) -> None:
        device, mids = built
        link = connect(dispatcher, device)
        for mid in mids[:3]:  # the burst: all recorded
            dispatcher.handle_publish(link, "ack", json.dumps({"ids": [mid]}).encode())  # type: ignore[arg-type]
        dispatcher.handle_publish(link, "ack", json.dumps({"ids": [mids[3]]}).encode())  # type: ignore[arg-type]
        assert dispatcher.counters["device_throttled"] == 1 and not link.closed
        ticks.advance(2.0)  # the dropped message was owed too: two seconds refill it and one more
        dispatcher.handle_publish(link, "ack", json.dumps({"ids": [mids[3]]}).encode())  # type: ignore[arg-type]
        await settle(dispatcher)
        assert [data.delivery(device, mid)[0] for mid in mids] == ["acked"] * 4 + ["queued"]
        for _ in range(2):  # keeps it up: owes more than a second's worth
            dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        assert link.closed and dispatcher.counters["devices_disconnected"] == 1
        dispatcher.handle_disconnected(link, "over its message rate")  # type: ignore[arg-type]
        again = connect(dispatcher, device)  # a reconnect does not refill the bucket
        dispatcher.handle_publish(again, "ack", json.dumps({"ids": [mids[4]]}).encode())  # type: ignore[arg-type]
        await settle(dispatcher)
        assert data.delivery(device, mids[4]) == ("queued", None)

    def build(data: BoxData) -> tuple[Device, list[str]]:
        device = data.device()
        return device, [data.push_to(device) for _ in range(5)]

    run_with_store(tmp_path, build, scenario, DeviceLimits(messages_per_s=1.0, messages_burst=3.0), ticks)


def test_an_unconfirmed_ack_over_the_rate_is_not_confirmed(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, built: tuple[Device, str]) -> None:
        device, mid = built
        link = connect(dispatcher, device)
        confirmed: list[int] = []
        for n in range(2):
            dispatcher.handle_ack(link, json.dumps({"ids": [mid]}).encode(),  # type: ignore[arg-type]
                                  lambda n=n: confirmed.append(n))
        await settle(dispatcher)
        assert confirmed == [0]  # the second was dropped: no PUBACK, so the device sends it again

    def build(data: BoxData) -> tuple[Device, str]:
        device = data.device()
        return device, data.push_to(device)

    run_with_store(tmp_path, build, scenario, DeviceLimits(messages_per_s=0.01, messages_burst=1.0))


def test_a_hello_cursor_past_the_last_seq_gets_a_resync_to_the_last_seq(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        link = connect(dispatcher, device)
        dispatcher.handle_publish(link, "hello", b'{"cursor": 1000000000000000}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert link.notices("resync") == [{"type": "resync", "through": 2, "reset": True}]
        accepted = dispatcher.prepare(data.app_id, {"title": "t"}, [device], 60, {})
        await dispatcher.submit([accepted])
        assert link.pushes() == [3]  # live from the box's last seq on

    def build(data: BoxData) -> Device:
        device = data.device()
        data.push_to(device)
        data.push_to(device)
        return device

    run_with_store(tmp_path, build, scenario)


def test_a_hello_cursor_outside_0_to_2_63_is_a_protocol_error_that_closes_the_connection(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, devices: list[Device]) -> None:
        cursors = [b"18446744073709551616", b"9223372036854775808", b"-1", b'"7"', b"true", b"1.5"]
        for device, cursor in zip(devices, cursors, strict=True):
            link = connect(dispatcher, device)
            dispatcher.handle_publish(link, "hello", b'{"cursor": %s}' % cursor)  # type: ignore[arg-type]
            assert link.closed, cursor
        assert dispatcher.counters["hellos_refused"] == len(cursors)

    run_with_store(tmp_path, lambda data: [data.device() for _ in range(6)], scenario)


def test_catch_up_reads_in_pages_and_hellos_during_it_coalesce(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        reads: list[str] = []
        real_read = dispatcher.store.read

        async def counted_read(fn: Callable[..., Any], *args: Any) -> Any:
            reads.append(fn.__name__)
            return await real_read(fn, *args)

        dispatcher.store.read = counted_read  # type: ignore[method-assign]
        link = connect(dispatcher, device)
        for _ in range(3):
            dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        await settle(dispatcher)
        assert link.pushes() == [1, 2, 3, 4, 5]  # once each: three hellos, one catch-up
        # The first catch-up gave way at its first read to the hellos behind it; the one run in their place
        # read pages of 2, 2 and 1: the first with the hello's first read, the others one trip each.
        assert reads == ["_read_catch_up", "_read_catch_up", "select_pending", "select_pending"]

    def build(data: BoxData) -> Device:
        device = data.device()
        for _ in range(5):
            data.push_to(device)
        return device

    run_with_store(tmp_path, build, scenario, DeviceLimits(catch_up_page=2))


def test_a_huge_request_is_written_in_several_transactions_and_others_commit_between(tmp_path: Path,
                                                                                      monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatch, "SUBMIT_CHUNK_ROWS", 4)

    async def scenario(dispatcher: Dispatcher, data: BoxData, devices: list[Device]) -> None:
        order: list[str] = []
        big = [dispatcher.prepare(data.app_id, {"title": f"all {n}"}, devices, 60, {}) for n in range(4)]
        submitted = asyncio.ensure_future(dispatcher.submit(big))
        await asyncio.sleep(0)  # its first part is queued
        other = dispatcher.store.write(lambda conn: order.append("other"))
        await other
        order.append("other done")
        await submitted
        order.append("big done")
        assert order == ["other", "other done", "big done"]  # the other app did not wait for all of it
        assert data.count("SELECT count(*) FROM deliveries") == 12

    run_with_store(tmp_path, lambda data: [data.device() for _ in range(3)], scenario)


def test_a_foreground_write_goes_ahead_of_queued_background_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", background_per_commit=2)
    order: list[str] = []

    async def main() -> None:
        for n in range(5):
            store.write_later(lambda conn, n=n: order.append(f"bg{n}"))
        foreground = store.write(lambda conn: order.append("fg"))
        store.start()
        await foreground
        await store.write_background(lambda conn: None)

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert order == ["fg", "bg0", "bg1", "bg2", "bg3", "bg4"]


def test_the_pushes_a_hello_makes_the_box_resend_count_against_the_device(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        link = connect(dispatcher, device)
        for _ in range(3):  # each replays all five: 1 + 5 a time, and the bucket holds 12
            dispatcher.handle_publish(link, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
            await settle(dispatcher)
        assert link.pushes() == [1, 2, 3, 4, 5] * 2
        assert dispatcher.counters["device_throttled"] == 1

    def build(data: BoxData) -> Device:
        device = data.device()
        for _ in range(5):
            data.push_to(device)
        return device

    run_with_store(tmp_path, build, scenario, DeviceLimits(messages_per_s=0.01, messages_burst=12.0))


def test_a_connection_taking_over_from_one_not_yet_gone_keeps_its_budget(tmp_path: Path) -> None:
    async def scenario(dispatcher: Dispatcher, data: BoxData, device: Device) -> None:
        first = connect(dispatcher, device)
        dispatcher.handle_publish(first, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        second = connect(dispatcher, device)  # before the first one's disconnect was seen
        dispatcher.handle_publish(second, "hello", b'{"cursor": 0}')  # type: ignore[arg-type]
        assert dispatcher.counters["device_throttled"] == 1

    run_with_store(tmp_path, lambda data: data.device(), scenario,
                   DeviceLimits(messages_per_s=0.01, messages_burst=1.0))
