"""Delivery: persist accepted pushes, write them into connected devices' inboxes, catch devices up on
hello, record acks, expire what outlived its TTL.

The store is the truth: a push reaches a device either live (the device is connected and caught up
when the push commits) or from the store when the device says hello with its cursor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.directory import Device, Directory
from appliance.store import messages as sql_messages
from appliance.store.devices import mark_seen

log = logging.getLogger("appliance.dispatch")

CONNECTED, CATCHING_UP, LIVE = 0, 1, 2
MAX_TRACKED_SENT = 4096  # per connection: message id -> seq, to turn acks into primary-key updates
MAX_CATCHUP_BUFFER = 10000  # live pushes held while a catch-up query runs; beyond it, query again
MAX_GAP_ENTRIES = 1000  # skipped pushes listed in one gap notice; more follow in further notices
MAX_ACK_ROWS_PER_JOB = 2000  # acks and marks per background write job: a 202 waits behind a few such jobs at most
MAX_REMEMBERED_BUCKETS = 20000  # devices whose message budget outlives their connection (oldest forgotten)
CURSOR_LIMIT = 1 << 63  # a hello's cursor must be an int in [0, 2^63): SQLite's INTEGER range
FUTURE_ID_SLACK_S = 300.0  # an acked id dated later than now + this is bogus without asking the store
# Rows per maintenance write job, so a 202 never waits behind a whole expiry sweep or retention purge (#10).
# The purge deletes in key order (few pages per batch); expiry updates rows in expiry order, spread over
# as many pages as rows, so its batches are smaller (bench/purge_latency.py: a push's commit waited a
# median 7-24 ms beside 500-row batches, 40-50 ms beside 2,000-row ones).
MAINTENANCE_BATCH = 2000
EXPIRY_BATCH = 500
# Inbox rows per write job of one provider request: 500 pushes `to: all` on a big box is hundreds of
# thousands of rows, seconds in one transaction that every other app's 202 would wait behind (#10). Split
# between whole pushes, a request's jobs are written one after another, other commits in between.
SUBMIT_CHUNK_ROWS = 20000


class Link(Protocol):
    """A device's connection, as the broker gives it."""

    client_id: str
    principal: Any
    closed: bool
    subscribed: bool

    def send_push(self, payload: bytes) -> bool: ...
    def close(self, reason: str, abort: bool = False) -> None: ...


class Store(Protocol):
    def write(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]: ...
    def write_background(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]: ...
    def write_later(self, fn: Callable[..., Any], *args: Any) -> None: ...
    async def read(self, fn: Callable[..., Any], *args: Any) -> Any: ...


_ID_BITS = random.Random(os.urandom(32)).getrandbits  # seeded once from the kernel: no system call per push
# One encoder for every push: json.dumps() with non-default options builds a new encoder at each call.
_ENCODE_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_IS_MESSAGE_ID = re.compile(r"m[0-9a-f]{28}\Z").match


def new_message_id(now: float) -> str:
    """Time-ordered, unique: `m` + 12 hex digits of milliseconds + 16 random hex digits. Not a secret (every
    read needs the app's key), so a seeded generator serves."""
    return f"m{int(now * 1000):012x}{_ID_BITS(64):016x}"


def is_message_id(value: str) -> bool:
    return _IS_MESSAGE_ID(value) is not None


def _device_doc(client_id: str, kind: str, payload: bytes) -> dict[str, Any] | None:
    """A device message's JSON object, or None (logged) when it is not one."""
    try:
        doc = json.loads(payload) if payload else {}
    except (ValueError, UnicodeDecodeError):
        log.info("event=bad_device_message client=%s kind=%s reason=not_json", client_id, kind)
        return None
    if not isinstance(doc, dict):
        log.info("event=bad_device_message client=%s kind=%s reason=not_object", client_id, kind)
        return None
    return doc


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """What one device connection may ask of the box (#10); docs/protocol.md, "Bounds"."""

    ack_ids_max: int = 100  # ids read from one ack; the rest are ignored (the device gets them again)
    messages_per_s: float = 100.0  # refilled per second: a hello costs 1 plus 1 per push its catch-up sends,
    # an ack 1 per id it carries
    messages_burst: float = 5000.0  # the bucket's size: a full inbox caught up and acked one push at a time, twice
    catch_up_page: int = 200  # pending pushes read per trip to the read pool during a catch-up


@dataclass(slots=True, eq=False)
class Online:
    """A connected device and where its delivery stands in this connection."""

    device: Device
    link: Link
    state: int = CONNECTED
    sent_through: int = 0
    buffer: list[tuple[int, str, bytes]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    requery: bool = False
    # The device's message budget, a token bucket that may run into debt: a message finding less than its
    # cost is dropped, and a device owing more than a second's worth of its rate is disconnected.
    tokens: float = 0.0
    refilled_at: float = 0.0
    next_hello: int | None = None  # a hello that came during a catch-up: the catch-up runs again from it
    throttle_logged: bool = False


@dataclass(slots=True)
class Accepted:
    """One push ready to persist: the message row, its targets, and the payload body sent to devices."""

    message: dict[str, Any]
    targets: list[Device]
    body: bytes  # the payload JSON without its opening brace; a device gets {"seq":N, + body
    fallback_channels: tuple[str, ...] = ()
    fallback_due: float = 0.0


class Dispatcher:
    """Implements the broker's DeviceGate and the delivery side of the provider API."""

    def __init__(self, store: Store, directory: Directory, inbox_limit: int = 1000,
                 clock: Callable[[], float] = time.time, limits: DeviceLimits | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.directory = directory
        self.inbox_limit = inbox_limit
        self.clock = clock
        self.monotonic = monotonic
        self.limits = limits or DeviceLimits()
        self.online: dict[int, Online] = {}
        self._delivered: list[tuple[float, int, int]] = []
        self._delivered_held: list[tuple[float, int, int]] = []  # sent in the previous flush window, not acked
        self._acks_by_seq: list[tuple[int, float, int, int, str, int]] = []
        self._acks_by_id: list[tuple[int, float, str, int, int]] = []
        self._confirmations: list[Callable[[], None]] = []  # run once the acks they confirm committed
        self._seen: dict[int, float] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._buckets: dict[int, tuple[float, float]] = {}  # device -> (tokens, at) of its last connection
        self.on_fallback_queued: Callable[[], None] | None = None
        self.counters = {"accepted": 0, "delivered": 0, "acked": 0, "expired": 0, "resyncs": 0, "gaps": 0,
                         "ack_ids_bogus": 0, "ack_ids_ignored": 0, "device_throttled": 0, "hellos_refused": 0,
                         "devices_disconnected": 0}

    # -- broker events (DeviceGate) --------------------------------------------------------------
    def authenticate(self, client_id: str, username: str | None, password: str | None) -> Device | None:
        return self.directory.authenticate_device(client_id, username, password)

    def identify(self, client_id: str) -> Device | None:
        """The device behind a client id, for a broker that authenticated it itself (Mosquitto: the
        password, or on a mutual-TLS listener the certificate's CN)."""
        return self.directory.by_client.get(client_id)

    def handle_connected(self, link: Link) -> None:
        device: Device = link.principal
        if device.id not in self.directory.by_id:  # revoked between CONNECT and now
            link.close("revoked")
            return
        previous = self.online.get(device.id)  # a connection taking over from one not yet gone
        tokens, refilled_at = self._buckets.pop(device.id, (self.limits.messages_burst, self.monotonic()))
        if previous is not None:
            tokens, refilled_at = previous.tokens, previous.refilled_at
        self.online[device.id] = Online(device, link, tokens=tokens, refilled_at=refilled_at)
        self._seen[device.id] = self.clock()
        self._schedule_flush()

    def handle_disconnected(self, link: Link, reason: str) -> None:
        device: Device = link.principal
        current = self.online.get(device.id)
        if current is not None and current.link is link:
            del self.online[device.id]
            if current.tokens < self.limits.messages_burst:  # a reconnect does not refill the bucket
                buckets = self._buckets
                buckets[device.id] = (current.tokens, current.refilled_at)
                if len(buckets) > MAX_REMEMBERED_BUCKETS:
                    del buckets[next(iter(buckets))]
            self._seen[device.id] = self.clock()
            self._schedule_flush()
            log.info("event=offline client=%s reason=%r", link.client_id, reason)

    def handle_publish(self, link: Link, kind: str, payload: bytes) -> None:
        online = self.online.get(link.principal.id)
        if online is None or online.link is not link:
            return
        if kind not in ("hello", "ack"):
            return  # "status" is the device's last will; presence already comes from the connection itself
        if not self._admit(online, 0.0, self._estimate(payload)):
            return  # in debt: dropped before it costs a parse
        doc = _device_doc(link.client_id, kind, payload)
        if doc is None:
            return
        if kind == "hello":
            self._handle_hello(online, doc)
        elif self._admit(online, _ack_cost(doc, self.limits.ack_ids_max)):
            self._record_ack(online.device.id, link.client_id, online.sent, doc, None)

    def _handle_hello(self, online: Online, doc: dict[str, Any]) -> None:
        link = online.link
        cursor = doc.get("cursor", 0)
        if not isinstance(cursor, int) or isinstance(cursor, bool) or not 0 <= cursor < CURSOR_LIMIT:
            # A protocol error, not a stuck connection: 2^64 cannot be a seq the box gave out (#10).
            self.counters["hellos_refused"] += 1
            log.info("event=bad_device_message client=%s kind=hello reason=bad_cursor action=disconnect",
                     link.client_id)
            link.close("protocol error: hello cursor is not an integer in [0, 2^63)", abort=True)
            return
        if not self._admit(online, 1.0):
            return
        if online.state == CATCHING_UP:
            online.next_hello = cursor  # coalesced: the running catch-up starts again from the latest cursor
            return
        online.state, online.buffer = CATCHING_UP, []  # now, so a hello right behind this one coalesces
        self._spawn(self._catch_up(online, cursor))

    def _estimate(self, payload: bytes) -> float:
        """What an unparsed message costs: an ack id takes some 32 bytes of JSON."""
        return float(max(1, min(len(payload) >> 5, self.limits.ack_ids_max)))

    def _admit(self, online: Online, cost: float, dropped_cost: float = 1.0) -> bool:
        """Charge a device message to its connection's bucket; False (counted, and past the debt limit the
        connection closed) when the device is over its rate. A cost of 0 only asks whether the device is in
        debt; a message dropped for that costs `dropped_cost`."""
        limits = self.limits
        now = self.monotonic()
        tokens = min(limits.messages_burst, online.tokens + (now - online.refilled_at) * limits.messages_per_s)
        online.refilled_at = now
        if tokens >= cost:
            online.tokens = tokens - cost
            return True
        online.tokens = tokens - (cost or dropped_cost)
        self.counters["device_throttled"] += 1
        if online.tokens < -limits.messages_per_s:  # over the burst, and it kept on for another second's worth
            online.tokens = -limits.messages_burst  # owed, at most: it gets back in after burst/rate seconds
            self.counters["devices_disconnected"] += 1
            log.warning("event=device_throttled client=%s action=disconnect rate=%g burst=%g", online.link.client_id,
                        limits.messages_per_s, limits.messages_burst)
            online.link.close("over its message rate", abort=True)
        elif not online.throttle_logged:
            online.throttle_logged = True
            log.info("event=device_throttled client=%s action=drop rate=%g burst=%g", online.link.client_id,
                     limits.messages_per_s, limits.messages_burst)
        return False

    def handle_ack(self, link: Link, payload: bytes, confirm: Callable[[], None]) -> None:
        """An ack PUBLISH from a broker that lets us confirm it (the embedded one): `confirm` sends its
        PUBACK, and runs only once the ack is committed, so a PUBACKed ack survives a crash (#10)."""
        online = self.online.get(link.principal.id)
        if online is not None and online.link is link and not self._admit(online, 0.0, self._estimate(payload)):
            return  # in debt: dropped unconfirmed before it costs a parse
        doc = _device_doc(link.client_id, "ack", payload)
        if doc is None:
            confirm()  # nothing to record: nothing to wait for
            return
        if online is not None and online.link is link:
            if not self._admit(online, _ack_cost(doc, self.limits.ack_ids_max)):
                return  # unconfirmed: a device that resends it after a reconnect gets it recorded then
            sent = online.sent
        else:
            sent = {}  # by message id
        self._record_ack(link.principal.id, link.client_id, sent, doc, confirm)

    def handle_detached_ack(self, device: Device, client_id: str, payload: bytes) -> None:
        """An ack that reached us apart from its device's connection: a broker relaying acks over several
        of our connections may hand one over before the device shows online, or after it went. Recorded
        by message id, like an ack of a push sent over an earlier connection."""
        doc = _device_doc(client_id, "ack", payload)
        if doc is not None:
            self._record_ack(device.id, client_id, {}, doc, None)

    # -- provider side ---------------------------------------------------------------------------
    def prepare(self, app_id: str, item: dict[str, Any], targets: list[Device], ttl_s: int,
                target_doc: dict[str, Any], fallback: dict[str, Any] | None = None) -> Accepted:
        now = self.clock()
        mid = new_message_id(now)
        expires_at = now + ttl_s
        payload = {
            "id": mid,
            "app_id": app_id,
            "title": item.get("title"),
            "body": item.get("body"),
            "data": item.get("data"),
            "priority": item.get("priority") or "normal",
            "collapse_key": item.get("collapse_key"),
            "sent_at": round(now, 3),
            "expires_at": round(expires_at, 3),
        }
        text = _ENCODE_COMPACT(payload)
        message = {
            "id": mid, "app_id": app_id, "created_at": now, "expires_at": expires_at, "payload": text,
            "collapse_key": item.get("collapse_key"), "target": json.dumps(target_doc), "targeted": len(targets),
            "fallback": json.dumps(fallback) if fallback else None,
        }
        channels = tuple(fallback["channels"]) if fallback else ()
        due = now + fallback["after_s"] if fallback else 0.0
        return Accepted(message, targets, text[1:].encode(), channels, due)

    async def submit(self, accepted: list[Accepted]) -> None:
        """Allocate per-device seqs, commit every push, then deliver to connected devices."""
        rows = []
        plan: list[tuple[Accepted, list[tuple[int, int]]]] = []
        for acc in accepted:
            deliveries = []
            for device in acc.targets:
                device.last_seq += 1
                deliveries.append((device.id, device.last_seq))
            rows.append(sql_messages.NewPush(acc.message, deliveries, acc.fallback_channels, acc.fallback_due))
            plan.append((acc, deliveries))
        total = sum(len(row.deliveries) for row in rows)
        if total <= SUBMIT_CHUNK_ROWS:
            await self.store.write(sql_messages.insert_pushes, rows)
        else:
            for chunk in _chunk_pushes(rows, SUBMIT_CHUNK_ROWS):
                await self.store.write(sql_messages.insert_pushes, chunk)
        self.counters["accepted"] += len(accepted)
        if self.on_fallback_queued is not None and any(acc.fallback_channels for acc in accepted):
            self.on_fallback_queued()
        if log.isEnabledFor(logging.INFO):  # one line per request: a 500-push batch is not 500 lines
            first = accepted[0].message
            log.info("event=accepted id=%s app=%s pushes=%d targeted=%d", first["id"], first["app_id"], len(accepted),
                     sum(len(deliveries) for _, deliveries in plan))
        online = self.online
        for acc, deliveries in plan:
            mid, body = acc.message["id"], acc.body
            for device_id, seq in deliveries:
                entry = online.get(device_id)
                if entry is not None:
                    self._deliver(entry, seq, mid, body)

    def _deliver(self, entry: Online, seq: int, mid: str, body: bytes) -> None:
        if entry.state == LIVE:
            if seq > entry.sent_through:
                self._send(entry, seq, mid, body)
        elif entry.state == CATCHING_UP:
            if len(entry.buffer) < MAX_CATCHUP_BUFFER:
                entry.buffer.append((seq, mid, body))
            else:
                entry.requery = True
        elif entry.link.subscribed and seq > entry.sent_through:
            # Subscribed but no hello (yet): a plain MQTT client gets live pushes; catch-up needs a hello.
            self._send(entry, seq, mid, body)

    def _send(self, entry: Online, seq: int, mid: str, body: bytes) -> None:
        if not entry.link.send_push(b'{"seq":%d,' % seq + body):
            return
        entry.sent_through = seq
        sent = entry.sent
        sent[mid] = seq
        if len(sent) > MAX_TRACKED_SENT:
            del sent[next(iter(sent))]
        self._delivered.append((self.clock(), entry.device.id, seq))
        self.counters["delivered"] += 1
        log.debug("event=delivered id=%s client=%s seq=%d", mid, entry.link.client_id, seq)
        self._schedule_flush()

    async def _catch_up(self, entry: Online, cursor: int) -> None:
        """Send a device what is pending above its cursor, `catch_up_page` rows per trip to the read pool (so
        one device with thousands pending cannot hold it, #10), then go live. A hello arriving meanwhile
        makes the catch-up run again from its cursor instead of starting a second one."""
        entry.state = CATCHING_UP
        entry.buffer = []
        while True:
            await self._catch_up_from(entry, cursor)
            if entry.link.closed or self.online.get(entry.device.id) is not entry:
                return
            if entry.next_hello is None:
                break
            cursor, entry.next_hello = entry.next_hello, None
        buffered, entry.buffer = entry.buffer, []
        for seq, mid, body in buffered:
            if seq > entry.sent_through:
                self._send(entry, seq, mid, body)
        entry.state = LIVE

    async def _catch_up_from(self, entry: Online, cursor: int) -> None:
        device = entry.device
        if cursor > device.last_seq:
            # A cursor past every seq the box gave this device (a restored box, a stale or invented cursor):
            # the device is told where the box stands and must set its cursor to it (#10).
            self._send_resync(entry, device.last_seq, reset=True)
            cursor = device.last_seq
        entry.sent_through = cursor
        page_size = self.limits.catch_up_page
        entry.requery = False
        overflow, skipped, rows = await self.store.read(_read_catch_up, device.id, cursor, self.clock(),
                                                        self.inbox_limit, page_size)
        if entry.link.closed or self.online.get(device.id) is not entry:
            return
        if overflow is not None:
            self.store.write_later(sql_messages.drop_through, device.id, overflow, self.clock())
            device.dropped_through = max(device.dropped_through, overflow)
        if cursor < device.dropped_through and entry.sent_through < device.dropped_through:
            self._send_resync(entry, device.dropped_through)
        if skipped:
            await self._send_gaps(entry, skipped, device.dropped_through)
        first = True
        while not entry.link.closed and self.online.get(device.id) is entry and entry.next_hello is None:
            if not first:
                entry.requery = False
                rows = await self.store.read(sql_messages.select_pending, device.id,
                                             max(entry.sent_through, device.dropped_through), self.clock(), page_size)
                if entry.link.closed or self.online.get(device.id) is not entry:
                    return
            first = False
            for seq, mid, payload in rows:
                if seq > entry.sent_through:
                    self._send(entry, seq, mid, payload[1:].encode())
            entry.tokens -= len(rows)  # what a hello makes the box send is the device's to pay for (#10)
            if len(rows) < page_size and not entry.requery:
                return

    def _send_resync(self, entry: Online, through: int, reset: bool = False) -> None:
        doc: dict[str, Any] = {"type": "resync", "through": through}
        if reset:
            doc["reset"] = True
        if entry.link.send_push(json.dumps(doc).encode()):
            entry.sent_through = through if reset else max(entry.sent_through, through)
            self.counters["resyncs"] += 1
            log.info("event=resync client=%s through=%d reset=%s", entry.link.client_id, through,
                     "yes" if reset else "no")

    async def _send_gaps(self, entry: Online, page: list[tuple[int, str, str]], floor: int) -> None:
        """Tell a catching-up device which pushes above its cursor it will never get and why (expired,
        cancelled, replaced), as a resync tells it of dropped ones: no silent holes (#10). `page` is the
        first page of them; further pages are read here. Seqs up to `floor` are covered by a resync."""
        while page and not entry.link.closed:
            listed = [{"seq": seq, "id": mid, "reason": why} for seq, mid, why in page if seq > floor]
            if listed:
                notice = json.dumps({"type": "gap", "skipped": listed}, separators=(",", ":")).encode()
                if not entry.link.send_push(notice):
                    return
                self.counters["gaps"] += 1
                log.info("event=gap client=%s skipped=%d through=%d", entry.link.client_id, len(listed),
                         listed[-1]["seq"])
            if len(page) < MAX_GAP_ENTRIES:
                return
            page = await self.store.read(sql_messages.select_skipped, entry.device.id, page[-1][0], self.clock(),
                                         MAX_GAP_ENTRIES)

    def _record_ack(self, device_id: int, client_id: str, sent: dict[str, int], doc: dict[str, Any],
                    confirm: Callable[[], None] | None) -> None:
        """`sent`: the seqs of what this connection sent the device, by message id ({} for none). `confirm`,
        and the ack receipt the device asked for with `"receipt": true`, follow the commit of the acks."""
        ids, state = doc.get("ids"), doc.get("state", "received")
        rank = sql_messages.ACK_RANKS.get(state) if isinstance(state, str) else None
        if not isinstance(ids, list) or rank is None:
            log.info("event=bad_device_message client=%s kind=ack reason=bad_fields", client_id)
            if confirm is not None:
                confirm()
            return
        if len(ids) > self.limits.ack_ids_max:
            # Past the bound the ids are ignored, not refused: the device gets those pushes again and acks
            # them again (at least once, #10).
            self.counters["ack_ids_ignored"] += len(ids) - self.limits.ack_ids_max
            ids = ids[:self.limits.ack_ids_max]
        if confirm is not None:
            self._confirmations.append(confirm)
        if doc.get("receipt") is True:
            valid = [mid for mid in ids if isinstance(mid, str) and is_message_id(mid)]
            self._confirmations.append(lambda: self._send_receipt(device_id, valid, state))
        now = self.clock()
        latest = f"m{int((now + FUTURE_ID_SLACK_S) * 1000):012x}~"
        bogus = 0
        for mid in ids:
            if not isinstance(mid, str) or not is_message_id(mid):
                bogus += 1
                continue
            seq = sent.pop(mid, None) if rank == 1 else sent.get(mid)
            if seq is not None:
                self._acks_by_seq.append((rank, now, device_id, seq, mid, rank))
                self.counters["acked"] += 1
            elif mid < latest:  # counted once the store found it in this device's inbox
                self._acks_by_id.append((rank, now, mid, device_id, rank))
            else:
                bogus += 1
        self.counters["ack_ids_bogus"] += bogus
        self._schedule_flush()

    def _send_receipt(self, device_id: int, ids: list[str], state: str) -> None:
        entry = self.online.get(device_id)
        if entry is not None:
            notice = {"type": "ack_receipt", "ids": ids, "state": state}
            entry.link.send_push(json.dumps(notice, separators=(",", ":")).encode())

    # -- bookkeeping -----------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.02, self.flush_marks)

    def flush_marks(self, final: bool = False) -> None:
        """Queue delivered marks, acks and last-seen times as one write (group-committed, not awaited by the
        loop); the acks' confirmations (PUBACK, ack receipt) run once that write has committed.

        A delivered mark waits one more flush window: a device acks within milliseconds, and its ack
        supersedes the mark, so most pushes cost one UPDATE, not two. (A mark lost in a crash only leaves
        the row `queued`, which redelivers it: the store stays on the safe side.)"""
        self._flush_handle = None
        fresh, self._delivered = self._delivered, []
        held, self._delivered_held = self._delivered_held, []
        by_seq, self._acks_by_seq = self._acks_by_seq, []
        by_id, self._acks_by_id = self._acks_by_id, []
        seen, self._seen = self._seen, {}
        confirmations, self._confirmations = self._confirmations, []
        if by_seq:
            acked = {(row[2], row[3]) for row in by_seq}
            held = [row for row in held if (row[1], row[2]) not in acked]
            fresh = [row for row in fresh if (row[1], row[2]) not in acked]
        if final:
            held, fresh = held + fresh, []
        seen_rows = [(t, d) for d, t in seen.items()]
        step = MAX_ACK_ROWS_PER_JOB
        while len(held) + len(by_seq) + len(by_id) > step:  # device traffic in jobs of bounded size
            chunk_held, held = held[:step], held[step:]
            chunk_seq, by_seq = by_seq[:step - len(chunk_held)], by_seq[step - len(chunk_held):]
            room = step - len(chunk_held) - len(chunk_seq)
            chunk_id, by_id = by_id[:room], by_id[room:]
            self._write_marks_job(chunk_held, chunk_seq, chunk_id, [], None)
        if confirmations or held or by_seq or by_id or seen_rows:
            self._write_marks_job(held, by_seq, by_id, seen_rows, confirmations)
        if fresh:
            self._delivered_held = fresh
            self._schedule_flush()

    def _write_marks_job(self, held: list[Any], by_seq: list[Any], by_id: list[Any], seen: list[Any],
                         confirmations: list[Callable[[], None]] | None) -> None:
        if not confirmations and not by_id:
            self.store.write_later(_write_marks, held, by_seq, by_id, seen)
            return
        written = self.store.write_background(_write_marks, held, by_seq, by_id, seen)
        if by_id:
            written.add_done_callback(lambda f: self._count_acks_by_id(f, len(by_id)))
        if confirmations:
            written.add_done_callback(lambda f: _run_confirmations(f, confirmations))

    def _count_acks_by_id(self, written: asyncio.Future[Any], n: int) -> None:
        if written.cancelled() or written.exception() is not None:
            return
        bogus = written.result()
        self.counters["ack_ids_bogus"] += bogus
        self.counters["acked"] += n - bogus
        if bogus:
            log.debug("event=bogus_ack_ids ids=%d", bogus)

    def drop_device(self, device: Device, reason: str) -> None:
        """Close a revoked or re-enrolled device's connection."""
        entry = self.online.pop(device.id, None)
        if entry is not None:
            entry.link.close(reason)

    async def sweep(self) -> None:
        """Expire what outlived its TTL and trim overfull inboxes, a bounded batch per write job."""
        expired = 0
        while True:
            n = await self.store.write_background(sql_messages.expire_batch, self.clock(), EXPIRY_BATCH)
            expired += n
            if n < EXPIRY_BATCH:
                break
        self.counters["expired"] += expired
        trimmed = 0
        for device_id in await self.store.read(sql_messages.select_overfull, self.inbox_limit):
            through = await self.store.write_background(sql_messages.trim_inbox, device_id, self.inbox_limit, self.clock())
            device = self.directory.by_id.get(device_id)
            if device is not None and through is not None:
                device.dropped_through = max(device.dropped_through, through)
                trimmed += 1
        if expired or trimmed:
            log.info("event=swept expired=%d trimmed_inboxes=%d", expired, trimmed)

    async def purge(self, before: float) -> int:
        """Retention: delete finished inbox rows and messages created before `before`, a bounded batch per
        write job; returns the inbox rows deleted."""
        cutoff_id = sql_messages.retention_cutoff_id(before)
        deleted, after_row = 0, (0, 0)
        while True:
            next_row, n = await self.store.write_background(sql_messages.purge_deliveries_batch, cutoff_id, after_row,
                                                 MAINTENANCE_BATCH)
            deleted += n
            if next_row is None:
                break
            after_row = next_row
        after_id: str | None = ""
        messages = 0
        while after_id is not None:
            after_id, n = await self.store.write_background(sql_messages.purge_messages_batch, cutoff_id, after_id,
                                                 MAINTENANCE_BATCH)
            messages += n
        log.info("event=purged deliveries=%d messages=%d", deleted, messages)
        return deleted

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=task_failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush_marks(final=True)


def _read_catch_up(conn: Any, device: int, cursor: int, now: float, inbox_limit: int,
                   page: int) -> tuple[int | None, list[Any], list[Any]]:
    """A hello's first read, in one trip to the read pool: the seq through which the inbox overflowed
    (None: it did not), the first page of the pushes above the cursor the device will never get, and the
    first page of those it will."""
    overflow = sql_messages.select_overflow(conn, device, cursor, now, inbox_limit)
    return (overflow, sql_messages.select_skipped(conn, device, cursor, now, MAX_GAP_ENTRIES),
            sql_messages.select_pending(conn, device, max(cursor, overflow or 0), now, page))


def _run_confirmations(written: asyncio.Future[Any], confirmations: list[Callable[[], None]]) -> None:
    if written.cancelled() or written.exception() is not None:
        return  # not committed: unconfirmed, so the device sends the ack again
    for confirm in confirmations:
        try:
            confirm()
        except Exception:
            log.exception("event=confirm_failed")


def _chunk_pushes(rows: list[sql_messages.NewPush], limit: int) -> list[list[sql_messages.NewPush]]:
    """Whole pushes in groups of about `limit` inbox rows (a push bigger than that is a group alone)."""
    chunks: list[list[sql_messages.NewPush]] = [[]]
    size = 0
    for row in rows:
        if chunks[-1] and size + len(row.deliveries) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += len(row.deliveries)
    return chunks


def _ack_cost(doc: dict[str, Any], ids_max: int) -> float:
    """An ack costs one message per id it carries (at least one), up to the ids that will be read."""
    ids = doc.get("ids")
    return float(max(1, min(len(ids), ids_max))) if isinstance(ids, list) else 1.0


def _write_marks(conn: Any, delivered: list[tuple[float, int, int]], by_seq: list[Any], by_id: list[Any],
                 seen: list[tuple[float, int]]) -> int:
    """Returns the acks by message id that named no push of their device (bogus)."""
    if delivered:
        sql_messages.mark_delivered(conn, delivered)
    bogus = sql_messages.mark_acked(conn, by_seq, by_id)
    if seen:
        mark_seen(conn, seen)
    return bogus
