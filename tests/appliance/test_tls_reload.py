"""A TLS reload (renewal, revocation) reads and parses files; the event loop that carries every connection
must keep running meanwhile (#10). The CRL is made a named pipe that answers only after a pause, like a
slow disk: a loop that reads it itself stands still for the whole pause."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from appliance.tls import TlsManager, TlsSettings

pytestmark = pytest.mark.asyncio
PAUSE_S = 1.0


def serve_slowly(fifo: Path, content: bytes, ticks: list[int], seen: dict[str, int]) -> None:
    """Wait for a reader to open the pipe, hold it PAUSE_S (noting the loop's ticks before and after), then
    hand over the CRL and put a plain file in the pipe's place, so later reads do not wait."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails with ENXIO until a reader waits
            break
        except OSError:
            time.sleep(0.01)
    else:
        return
    seen["before"] = ticks[0]
    time.sleep(PAUSE_S)
    seen["after"] = ticks[0]
    plain = fifo.with_suffix(".plain")
    plain.write_bytes(content)
    os.replace(plain, fifo)
    os.set_blocking(fd, True)
    os.write(fd, content)
    os.close(fd)


async def test_reading_a_slow_crl_never_stops_the_event_loop(tmp_path: Path) -> None:
    tls = TlsManager(TlsSettings(tmp_path / "certs", ["localhost"], None, "ec-p256", 30, 0.05))
    await asyncio.to_thread(tls.ensure)
    tls.context("required")  # a listener that checks device certificates reads the CRL at every reload
    crl = tls.store.ca.crl
    content = crl.read_bytes()
    reloaded = asyncio.Event()
    tls.on_reloaded = lambda: tls_loop.call_soon_threadsafe(reloaded.set)
    tls_loop = asyncio.get_running_loop()

    ticks = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks[0] += 1

    ticker = asyncio.create_task(tick())
    crl.unlink()
    os.mkfifo(crl)  # a changed CRL file: the watcher rebuilds the contexts
    seen: dict[str, int] = {}
    feeder = threading.Thread(target=serve_slowly, args=(crl, content, ticks, seen), daemon=True)
    feeder.start()
    watcher = asyncio.create_task(tls.watch())
    try:
        await asyncio.wait_for(reloaded.wait(), 30)
    finally:
        watcher.cancel()
        ticker.cancel()
        await asyncio.gather(watcher, ticker, return_exceptions=True)
        feeder.join(30)
    assert seen, "the watcher never read the changed CRL"
    # About PAUSE_S / 10 ms = 100 ticks when the loop runs; none when the read blocks it.
    assert seen["after"] - seen["before"] >= 10, seen
