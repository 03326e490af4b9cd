"""Escalation to SMS and e-mail: a push a device has not acknowledged by its fallback deadline goes out
through the configured fallback sender, at most once per (push, device, channel).

Rows live in the store (`escalations`), so a burst is queued on disk, survives a restart, and drains at
each channel's rate limit. A send is marked `sending` (committed) before it starts; a graceful stop lets
such sends finish (up to its timeout), and a row still found in that state at the next start is recorded
as `interrupted` and not sent again: at most once, never silently.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.store import escalations as sql
from appliance.store import messages as sql_messages

log = logging.getLogger("appliance.dispatch")

QUEUE_PER_CHANNEL = 200
SCAN_IDLE_S = 1.0
# systemd's TimeoutStopSec is 30 s (image/intrapush.service); a send in flight gets most of it, the rest of
# the stop (broker, last writes, checkpoint) needs a few seconds.
STOP_TIMEOUT_S = 20.0
SKIP_STATES = {
    sql_messages.ACKED: "acked",
    sql_messages.CANCELLED: "cancelled",
    sql_messages.REPLACED: "replaced",
    sql_messages.RETIRED: "unregistered",
}


class Sender(Protocol):
    """A fallback transport (fallback.base.Sender)."""

    async def send(self, notice: Any) -> Any: ...
    async def aclose(self) -> None: ...


class Store(Protocol):
    def write(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]: ...
    def write_later(self, fn: Callable[..., Any], *args: Any) -> None: ...
    async def read(self, fn: Callable[..., Any], *args: Any) -> Any: ...


@dataclass(frozen=True)
class ChannelSettings:
    rate_per_min: float
    max_attempts: int
    retry_initial_s: float
    retry_max_s: float


class RateLimit:
    """At most `per_min` starts a minute, evenly spaced (a modem or relay is not flooded by a burst)."""

    def __init__(self, per_min: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 60.0 / per_min if per_min > 0 else 0.0
        self.clock = clock
        self.next_at = 0.0

    async def wait(self) -> None:
        now = self.clock()
        if self.next_at > now:
            await asyncio.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + self.interval


def compose(channel: str, payload: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """The notice's text (pure: tested without any sender)."""
    title, body = payload.get("title") or "", payload.get("body") or ""
    if channel == "sms":
        text = policy.get("sms_text") or (f"{title}: {body}" if title and body else title or body)
        return {"text": text or "You have a new notification."}
    subject = policy.get("email_subject") or title or "Notification"
    text = body or title or "You have a new notification."
    html_part = f"<h3>{html.escape(title)}</h3><p>{html.escape(body)}</p>" if title else f"<p>{html.escape(text)}</p>"
    return {"text": text, "subject": subject, "html": html_part}


class Escalator:
    def __init__(self, store: Store, senders: dict[str, Sender], settings: dict[str, ChannelSettings],
                 notice_factory: Callable[..., Any], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.senders = senders
        self.settings = settings
        self.notice_factory = notice_factory
        self.clock = clock
        self.queues: dict[str, asyncio.Queue[tuple[str, int, str, int]]] = {
            ch: asyncio.Queue(QUEUE_PER_CHANNEL) for ch in senders}
        self.inflight: set[tuple[str, int, str]] = set()
        self.wakeup = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.workers: dict[asyncio.Task[Any], bool] = {}  # channel worker -> is a send under way
        self.stopping = False
        self.counters = {"sent": 0, "failed": 0, "retried": 0, "skipped": 0}

    async def start(self) -> None:
        interrupted = await self.store.write(sql.mark_interrupted, self.clock())
        if interrupted:
            log.warning("event=fallback_interrupted count=%d note=%s", interrupted,
                        "sends under way at the last stop are recorded as interrupted, not repeated")
        self.tasks.append(asyncio.create_task(self._scan_forever()))
        for channel in self.senders:
            task = asyncio.create_task(self._work(channel))
            self.workers[task] = False
            self.tasks.append(task)

    def poke(self) -> None:
        """A push with fallback was accepted: rescan soon (its deadline may be short)."""
        self.wakeup.set()

    async def _scan_forever(self) -> None:
        while True:
            try:
                await self._scan_once()
            except Exception:
                log.exception("event=fallback_scan_failed")
            next_due = await self.store.read(sql.next_due)
            delay = SCAN_IDLE_S if next_due is None else min(SCAN_IDLE_S, max(0.01, next_due - self.clock()))
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _scan_once(self) -> None:
        limit = QUEUE_PER_CHANNEL * max(1, len(self.senders)) + len(self.inflight) + 50
        for message_id, device, channel, attempts, _due in await self.store.read(sql.select_due, self.clock(), limit):
            key = (message_id, device, channel)
            if key in self.inflight:
                continue
            queue = self.queues.get(channel)
            if queue is None:
                await self._finish(key, sql.FAILED, attempts, "channel_not_configured", None)
                continue
            if queue.full():
                continue
            self.inflight.add(key)
            queue.put_nowait((message_id, device, channel, attempts))

    async def _work(self, channel: str) -> None:
        settings = self.settings[channel]
        limit = RateLimit(settings.rate_per_min)
        queue = self.queues[channel]
        while not self.stopping:
            message_id, device, _, attempts = await queue.get()
            key = (message_id, device, channel)
            try:
                await self._escalate(key, attempts, settings, limit)
            except Exception:
                log.exception("event=fallback_failed_internally id=%s device=%s channel=%s", *key)
                await self._finish(key, sql.FAILED, attempts + 1, "internal_error", None)
            finally:
                self.inflight.discard(key)
                self.workers[asyncio.current_task()] = False  # type: ignore[index]

    async def _escalate(self, key: tuple[str, int, str], attempts: int, settings: ChannelSettings,
                        limit: RateLimit) -> None:
        message_id, device, channel = key
        row = await self.store.read(sql.context, *key)
        skip = self._skip_reason(row)
        if skip is not None:
            self.counters["skipped"] += 1
            await self._finish(key, sql.SKIPPED, attempts, skip, None)
            return
        assert row is not None
        payload_text, policy_text, _expires, _state, _ack, phone, email, alias_phone, alias_email, token = row
        policy = json.loads(policy_text or "{}")
        to = (phone or alias_phone) if channel == "sms" else (email or alias_email)
        if not to:
            await self._finish(key, sql.FAILED, attempts, "no_contact", None)
            log.info("event=fallback_failed id=%s token=%s channel=%s reason=no_contact", message_id, token, channel)
            return
        await limit.wait()
        # Re-read after the rate-limit wait: an ack that arrived meanwhile cancels the send.
        skip = self._skip_reason(await self.store.read(sql.context, *key))
        if skip is not None:
            self.counters["skipped"] += 1
            await self._finish(key, sql.SKIPPED, attempts, skip, None)
            return
        # From here to the outcome's record the send is under way: a graceful stop waits for it.
        self.workers[asyncio.current_task()] = True  # type: ignore[index]
        committed = await self.store.write(sql.set_state, key, sql.SENDING, attempts + 1, self.clock(), None, None,
                                           self.clock())
        if not committed:
            return
        notice = self.notice_factory(channel=channel, to=to, reference=f"{message_id}:{device}",
                                     **compose(channel, json.loads(payload_text), policy))
        try:
            receipt = await self.senders[channel].send(notice)
        except Exception as exc:  # fallback.TemporaryFailure / PermanentFailure / anything else
            reason = getattr(exc, "reason", "internal_error")
            temporary = bool(getattr(exc, "temporary", False))
            if temporary and attempts + 1 < settings.max_attempts:
                hint = getattr(exc, "retry_after_s", None)
                delay = hint or min(settings.retry_max_s, settings.retry_initial_s * 2 ** attempts)
                self.counters["retried"] += 1
                await self._finish(key, sql.PENDING, attempts + 1, reason, None, next_at=self.clock() + delay)
                log.info("event=fallback_retry id=%s token=%s channel=%s reason=%s in_s=%.0f", message_id, token,
                         channel, reason, delay)
            else:
                self.counters["failed"] += 1
                await self._finish(key, sql.FAILED, attempts + 1, reason, None)
                log.warning("event=fallback_failed id=%s token=%s channel=%s reason=%s detail=%r", message_id,
                            token, channel, reason, str(exc)[:200])
            return
        self.counters["sent"] += 1
        doc = {"transport": receipt.transport, "ids": list(receipt.message_ids), "parts": receipt.parts}
        await self._finish(key, sql.SENT, attempts + 1, None, json.dumps(doc))
        log.info("event=escalated id=%s token=%s channel=%s transport=%s", message_id, token, channel,
                 receipt.transport)

    def _skip_reason(self, row: tuple[Any, ...] | None) -> str | None:
        """Why an escalation must not be sent, or None. An acked push is never escalated, whatever state its
        inbox row shows; a push whose message or inbox row retention removed is not either (#10)."""
        if row is None:
            return "purged"  # the message is gone: the escalation goes with it, never re-selected
        _payload, policy_text, expires_at, delivery_state, ack, *_ = row
        if delivery_state is None:
            return "purged"
        if ack is not None:
            return "acked"
        skip = SKIP_STATES.get(delivery_state)
        if skip is None and (delivery_state == sql_messages.EXPIRED or self.clock() >= expires_at):
            skip = None if json.loads(policy_text or "{}").get("even_if_expired") else "expired"
        return skip

    async def _finish(self, key: tuple[str, int, str], state: int, attempts: int, reason: str | None,
                      receipt: str | None, next_at: float | None = None) -> None:
        now = self.clock()
        await self.store.write(sql.set_state, key, state, attempts, now if next_at is None else next_at, reason,
                               receipt, now)

    async def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop taking escalations; let sends under way finish and record their outcome, up to `timeout_s`.
        A send still under way then is cancelled, stays `sending`, and the next start records it as
        `interrupted` without sending again (at most once per channel)."""
        self.stopping = True
        sending = [task for task, busy in self.workers.items() if busy and not task.done()]
        for task in self.tasks:
            if task not in sending:
                task.cancel()
        if sending:
            log.info("event=fallback_draining sends=%d timeout_s=%.0f", len(sending), timeout_s)
            _done, late = await asyncio.wait(sending, timeout=timeout_s)
            if late:
                log.warning("event=fallback_stop_timeout sends=%d note=%s", len(late),
                            "recorded as interrupted at the next start, not sent again")
            for task in late:
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sender in self.senders.values():
            try:
                await sender.aclose()
            except Exception:
                log.exception("event=fallback_close_failed")
