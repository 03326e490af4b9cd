"""The composition root: builds, starts and stops every part of the box, in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from appliance import metrics
from appliance.accounts import Accounts
from appliance.api.admin import AdminApi
from appliance.api.limits import Limits
from appliance.api.edge import EdgeLimits, EdgeRunner, EdgeSite
from appliance.api.openapi import ApiLimits
from appliance.api.provider import ProviderApi, ProviderSettings
from appliance.api.routes import build_admin_app, build_metrics_app, build_provider_app
from appliance.broker.admission import exempt_sources
from appliance.broker.embedded import BrokerLimits, EmbeddedBroker, ListenerSpec
from appliance.config import Config, parse_listen
from appliance.datadir import RUN_FILE
from appliance.directory import Directory
from appliance.dispatch import DeviceLimits, Dispatcher
from appliance.errors import StartupError
from appliance.escalation import ChannelSettings, Escalator
from appliance.store import Store
from appliance.store import devices as sql_devices
from appliance.tls import TlsManager, TlsSettings, default_names
from certs import CertError, CertStore
from fallback.base import Notice

GC_THRESHOLDS = (50_000, 20, 100)
log = logging.getLogger("appliance.daemon")
PURGE_EVERY_S = 3600.0


def build_fallback_senders(cfg: Config) -> dict[str, Any]:
    """One sender per channel whose transport is configured (fallback.build_sender validates the rest)."""
    senders: dict[str, Any] = {}
    for channel in ("sms", "email"):
        prefix = f"fallback.{channel}."
        transport = cfg.values[prefix + "transport"]
        if not transport:
            continue
        from fallback import build_sender  # noqa: PLC0415 - transports load only when configured

        settings = {k[len(prefix):]: v for k, v in cfg.values.items()
                    if k.startswith(prefix) and k[len(prefix):] != "rate_per_min"}
        try:
            senders[channel] = build_sender(channel, settings)
        except ValueError as exc:
            raise StartupError(f"[fallback.{channel}] {exc}") from exc
    return senders


def fallback_settings(cfg: Config) -> dict[str, ChannelSettings]:
    v = cfg.values
    return {channel: ChannelSettings(v[f"fallback.{channel}.rate_per_min"], v["fallback.max_attempts"],
                                     v["fallback.retry_initial_s"], v["fallback.retry_max_s"])
            for channel in ("sms", "email")}


def _address(sock_name: tuple[Any, ...]) -> str:
    host, port = sock_name[0], sock_name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.rpartition(":")[0].strip("[]")).is_loopback


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        self.broker: Any = None  # EmbeddedBroker or mosquitto.MosquittoBroker
        self.dispatcher: Dispatcher | None = None
        self.escalator: Escalator | None = None
        self.tls: TlsManager | None = None
        self.directory = Directory()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.addresses: dict[str, str] = {}
        self.started_at = time.time()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        store = self.store = Store(cfg.path("store.path"), cfg.store.synchronous, cfg.store.max_group)
        store.start()
        lim = cfg.limits
        dispatcher = self.dispatcher = Dispatcher(store, self.directory, cfg.push.inbox_limit, limits=DeviceLimits(
            lim.device_ack_ids_max, lim.device_messages_per_s, lim.device_messages_burst, lim.catch_up_page))
        cert_store = CertStore(cfg.path("certs.dir"), passphrase=cfg.certs.ca_passphrase or None)
        accounts = Accounts(store, self.directory, dispatcher.drop_device, cert_store)
        accounts.load()
        senders = build_fallback_senders(cfg)
        self.escalator = Escalator(store, senders, fallback_settings(cfg), Notice)
        dispatcher.on_fallback_queued = self.escalator.poke
        await self.escalator.start()

        tls = self.tls = TlsManager(TlsSettings(
            directory=cfg.path("certs.dir"),
            names=[n.strip() for n in cfg.certs.names.split(",") if n.strip()] or default_names(),
            passphrase=cfg.certs.ca_passphrase or None, key_type=cfg.certs.key_type,
            renew_before_days=cfg.certs.renew_before_days, check_interval_s=cfg.certs.check_interval_s))
        try:
            await asyncio.to_thread(tls.ensure)
        except CertError as exc:
            raise StartupError(f"the certificate authority in {cfg.path('certs.dir')} cannot be used: {exc}") from exc

        b = cfg.broker
        specs = []
        for name, kind, listen, mode in (("mqtt-tls", "tcp", b.tls_listen, b.tls_client_cert),
                                         ("mqtt-wss", "ws", b.wss_listen, b.wss_client_cert),
                                         ("mqtt", "tcp", b.listen, None), ("mqtt-ws", "ws", b.ws_listen, None)):
            addr = parse_listen(listen)
            if addr:
                ctx = tls.context(mode) if mode is not None else None
                specs.append(ListenerSpec(name, kind, addr[0], addr[1], ctx, mode or "none"))
        if not specs:
            raise StartupError("no MQTT listener: set broker.tls_listen (or another broker.*listen)")
        limits = BrokerLimits(b.connect_timeout_s, b.max_packet_bytes, b.max_keepalive_s, b.keepalive_grace,
                              b.max_write_buffer_bytes, b.connect_rate_per_source, b.connect_burst_per_source,
                              b.max_connections_per_source, exempt_sources(b.connect_limit_exempt))
        if b.backend == "mosquitto":
            from appliance.broker import mosquitto  # noqa: PLC0415 - only this backend needs it
            self.broker = mosquitto.from_config(cfg, specs, dispatcher, self._broker_logins, tls.store)
            accounts.credentials = self.broker  # enroll and revoke add and remove Mosquitto logins
            tls.on_reloaded = self.broker.reload_tls  # renewal, revocation and CA rotation reach Mosquitto too
        else:
            self.broker = EmbeddedBroker(specs, dispatcher, limits, b.max_connections)
        try:
            await self.broker.start()
        except Exception as exc:
            raise StartupError(f"the MQTT broker cannot start: {exc.__cause__ or exc}") from exc
        bound = self.broker.bound_addresses()
        for name, sockname in bound.items():
            self.addresses[name] = _address(sockname)
        device_listener = "mqtt-tls" if "mqtt-tls" in bound else "mqtt" if "mqtt" in bound else None
        web_listener = "mqtt-wss" if "mqtt-wss" in bound else "mqtt-ws" if "mqtt-ws" in bound else None

        settings = ProviderSettings(
            max_batch=cfg.api.max_batch, max_tokens=cfg.api.max_tokens, default_ttl_s=cfg.push.default_ttl_s,
            max_ttl_s=cfg.push.max_ttl_s, max_payload_bytes=cfg.push.max_payload_bytes,
            status_detail_limit=cfg.push.status_detail_limit, public_host=b.public_host,
            mqtt_port=b.public_port or (bound[device_listener][1] if device_listener else 0),
            mqtt_tls=device_listener == "mqtt-tls",
            websocket_url=(f"{'wss' if web_listener == 'mqtt-wss' else 'ws'}://{{host}}:{bound[web_listener][1]}/"
                           if web_listener else None),
            tls_info=tls.enrollment_info(), fallback_channels=frozenset(senders),
            keepalive={"ios": b.keepalive_ios_s, "android": b.keepalive_android_s,
                       "web": b.keepalive_web_s, "desktop": b.keepalive_desktop_s},
        )
        provider = ProviderApi(settings, self.directory, dispatcher, store, accounts,
                               Limits(cfg.limits.app_pushes_per_s, cfg.limits.app_targets_per_min))
        contract = ApiLimits(cfg.api.max_body_bytes, cfg.api.max_batch, cfg.api.max_tokens, cfg.push.max_ttl_s,
                             cfg.push.max_payload_bytes)
        http = build_provider_app(provider.routes(), cfg.api.max_body_bytes, EdgeLimits(
            cfg.api.header_timeout_s, cfg.api.body_timeout_s, cfg.api.max_connections,
            cfg.api.max_connections_per_address, cfg.api.max_header_bytes, cfg.api.max_unregistered_listed),
            contract)
        runner = EdgeRunner(http, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        for name, listen, ctx in (("https", cfg.api.tls_listen, tls.context("none")), ("http", cfg.api.listen, None)):
            addr = parse_listen(listen)
            if not addr:
                continue
            site = EdgeSite(runner, addr[0], addr[1], ssl_context=ctx, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(f"the HTTP API cannot listen on {listen}: {exc.strerror}") from exc
            self.addresses[name] = _address(site._server.sockets[0].getsockname())  # noqa: SLF001
        if "https" not in self.addresses and "http" not in self.addresses:
            raise StartupError("no HTTP listener: set api.tls_listen (or api.listen)")

        await self._serve_admin(AdminApi(accounts, self.status))
        await self._serve_metrics()

        self._tasks.append(asyncio.create_task(self._sweep_forever()))
        self._tasks.append(asyncio.create_task(tls.watch()))
        for name, addr in self.addresses.items():
            if name in ("mqtt", "mqtt-ws", "http") or (name == "metrics" and not _is_loopback(addr)):
                log.warning("event=plain_listener name=%s address=%s note=%s", name, addr,
                            "no TLS on this listener: use it only on a trusted network")
        log.info("event=listening %s", " ".join(f"{k}={v}" for k, v in self.addresses.items()))
        # run.json last, whole (written aside, then renamed): who sees it sees a started daemon.
        run_file = self.cfg.data_dir / RUN_FILE
        run_file.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), **self.addresses}))
        run_file.with_suffix(".tmp").replace(run_file)
        # What start-up built (directory, TLS contexts, broker) lives as long as the daemon: keep it out of
        # the collector's full scans, and let young objects (a push's dicts) die before a collection sees
        # them. Unchanged, a full collection came every ~0.4 s under load, took 40-75 ms at 10,000
        # devices, found nothing to free, and held every push meanwhile.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def _serve_admin(self, admin: AdminApi) -> None:
        """The admin API on its Unix socket, owner only. The data directory's lock is ours (appliance/datadir.py),
        so a socket file left here is a dead daemon's: replace it."""
        socket_path = self.cfg.path("api.admin_socket")
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        admin_runner = web.AppRunner(build_admin_app(admin.routes(), self.render_metrics), access_log=None,
                                     handle_signals=False)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        old_umask = os.umask(0o077)  # the socket is the admin API's access control: owner only
        try:
            await web.UnixSite(admin_runner, str(socket_path)).start()
        finally:
            os.umask(old_umask)
        self.addresses["admin"] = str(socket_path)

    async def _serve_metrics(self) -> None:
        """Prometheus text on its own plain-HTTP listener (`metrics.listen`, loopback by default), never on the
        provider port, which faces every application server (#9)."""
        listen = self.cfg.metrics.listen
        addr = parse_listen(listen)
        if not addr:
            return
        runner = web.AppRunner(build_metrics_app(self.render_metrics), access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, addr[0], addr[1], reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"the metrics listener cannot listen on {listen}: {exc.strerror}") from exc
        self.addresses["metrics"] = _address(site._server.sockets[0].getsockname())  # noqa: SLF001

    async def _broker_logins(self) -> list[tuple[str, str | None]]:
        """Every active device's MQTT login, for a broker that holds them itself (Mosquitto)."""
        assert self.store is not None
        return await self.store.read(sql_devices.select_broker_credentials)

    async def _sweep_forever(self) -> None:
        """Expiry every `push.expiry_sweep_s`, retention every hour; both in bounded write batches, so
        neither holds up a push (#10)."""
        assert self.dispatcher is not None
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.push.expiry_sweep_s)
            try:
                await self.dispatcher.sweep()
                if time.monotonic() - last_purge >= PURGE_EVERY_S:
                    last_purge = time.monotonic()
                    await self.dispatcher.purge(time.time() - self.cfg.store.retention_days * 86400)
            except Exception:
                log.exception("event=sweep_failed")

    def status(self) -> dict[str, Any]:
        assert self.dispatcher is not None
        return {"started_at": self.started_at, "addresses": self.addresses,
                "devices_online": len(self.dispatcher.online), "metrics": self.metrics_snapshot()}

    def metrics_snapshot(self) -> dict[str, float]:
        return metrics.snapshot(self.dispatcher, self.broker, self.store, self.directory)

    def render_metrics(self) -> str:
        return metrics.render(self.metrics_snapshot())

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
            log.info("event=stopping")
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop taking requests, close devices, let fallback sends under way finish, finish queued writes,
        close the store. The fallback drain starts first and runs beside the rest of the stop."""
        draining = asyncio.ensure_future(self.escalator.close()) if self.escalator is not None else None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.shutdown()
        if draining is not None:
            await draining
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        with contextlib.suppress(FileNotFoundError):
            (self.cfg.data_dir / RUN_FILE).unlink()
        log.info("event=stopped")
