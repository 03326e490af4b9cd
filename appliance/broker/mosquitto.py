"""The Mosquitto backend: devices connect to Mosquitto (a supervised child, or an external broker at
`broker.url`), and intrapush joins it as one privileged MQTT client.

Behind the same seam as the embedded broker: the dispatcher is the DeviceGate, and each online device is
a VirtualLink whose send_push() publishes to `push/<client id>/inbox` at QoS 1 over one of our
connections (always the same one for a device).
  - logins: Mosquitto's dynamic-security plugin; devices are written into its file from the store at every
    start and added/removed at run time over `$CONTROL/dynamic-security/v1` (deleteClient also kicks);
  - topic ACL: a dynamic-security role per device (it subscribes to and reads its inbox, writes its
    hello/ack/status; anything else is refused), see mosquitto_child;
  - presence: Mosquitto's own connect/disconnect/subscribe log lines, which it publishes on
    `$SYS/broker/log/#`; a hello also marks its device online, its last will offline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import shutil
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from pathlib import Path
from urllib.parse import unquote, urlsplit

from appliance.broker import topics
from appliance.broker.mosquitto_child import (ACK_SHARE, ADMIN_USER, CA_BUNDLE, CRL_BUNDLE, ChildListener,
                                            ChildSettings, MosquittoChild, TrustSources, child_file_limit,
                                            derived_max_connections, device_acls, device_role_name, free_ports)
from appliance.broker.mqtt_client import MqttSession, topic_header
from appliance.errors import StartupError

log = logging.getLogger("appliance.broker")

CONTROL = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE = CONTROL + "/response"
LOG_PREFIX = "$SYS/broker/log/"
# Acks, the busiest device messages, are shared among all our connections (MQTT 5 shared subscription), so
# that our PUBACKs for them reach Mosquitto over all of them, not one.
ACKS = (ACK_SHARE, 1)
SUBSCRIPTIONS = [("push/+/hello", 1), ACKS, ("push/+/status", 1), (LOG_PREFIX + "#", 1), (CONTROL_RESPONSE, 1)]
CONTROL_TIMEOUT_S = 15.0
PUBLISH_LANES = 16  # connections that carry pushes (the first also carries everything else); docs/broker.md
_CONNECTED = re.compile(r"New client connected from (\S+) as (\S+) \(p\d+, c\d+, k(\d+)")
# "Client X disconnected." / "closed its connection." / "has exceeded timeout, disconnecting." /
# "disconnected due to protocol error." / "disconnected, not authorised." / "already connected, closing old
# connection." (the old connection of a takeover), as Mosquitto 2.0.11 prints them.
_GONE = ("disconnected", "closed its connection", "has exceeded timeout", "already connected")
_HARMLESS_ERRORS = {"createClient": "Client already exists", "deleteClient": "Client not found",
                    "createRole": "Role already exists", "deleteRole": "Role not found"}


def _ignore_connected(_session_present: bool) -> None:
    return None


class DeviceGate(Protocol):
    """The embedded broker's gate, plus a lookup: Mosquitto has already checked the password."""

    def identify(self, client_id: str) -> Any | None: ...
    def handle_detached_ack(self, device: Any, client_id: str, payload: bytes) -> None: ...
    def handle_connected(self, link: VirtualLink) -> None: ...
    def handle_publish(self, link: VirtualLink, kind: str, payload: bytes) -> None: ...
    def handle_disconnected(self, link: VirtualLink, reason: str) -> None: ...

# A device Mosquitto disconnected for the box (a protocol error, over its message rate) cannot log in again
# for this long: long enough that a flooding client's reconnect loop costs nothing, short for a real app.
KICK_HOLD_S = 10.0


class VirtualLink:
    """One device connected to Mosquitto, as the dispatcher sees it."""

    __slots__ = ("client_id", "principal", "peer", "closed", "subscribed", "close_reason", "_broker", "_topic", "_lane")

    def __init__(self, broker: MosquittoBroker, client_id: str, principal: Any, peer: str) -> None:
        self.client_id = client_id
        self.principal = principal
        self.peer = peer
        self.closed = False
        self.subscribed = False
        self.close_reason = ""
        self._broker = broker
        self._topic = topic_header(topics.inbox_topic(client_id))
        self._lane = broker.lane_for(client_id)  # one device's pushes always take the same connection: in order

    def send_push(self, payload: bytes) -> bool:
        """Publish one QoS 1 push to the device's inbox; False when the link is gone."""
        if self.closed:
            return False
        return self._lane.publish(self._topic, payload)

    def close(self, reason: str, abort: bool = False) -> None:
        """Forget the link. A revoked or re-enrolled device is disconnected by Mosquitto itself when its
        login is deleted; `abort` (a protocol error, a device over its message rate, #10) has Mosquitto
        disconnect it; other reasons only stop deliveries until the device connects again."""
        if not self.closed:
            self._broker.drop_link(self, reason)
            if abort:
                self._broker.kick(self.client_id)


@dataclass
class MosquittoSettings:
    child: ChildSettings | None  # None: an external broker at `url`
    url: str = ""
    max_keepalive_s: int = 1200


def parse_url(url: str) -> tuple[str, int, str, str, bool]:
    """`mqtt[s]://user:password@host:port` -> host, port, user, password, tls."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"expected mqtt://user:password@host:port or mqtts://…, got {url!r}")
    tls = parts.scheme == "mqtts"
    return (parts.hostname, parts.port or (8883 if tls else 1883), unquote(parts.username or ""),
            unquote(parts.password or ""), tls)


class MosquittoBroker:
    """Presence, device messages and device logins through one privileged session to Mosquitto; pushes and
    acks also over PUBLISH_LANES - 1 more connections with the same login."""

    def __init__(self, settings: MosquittoSettings, gate: DeviceGate,
                 load_devices: Callable[[], Awaitable[list[tuple[str, str | None]]]]) -> None:
        self.settings = settings
        self.gate = gate
        self.links: dict[str, VirtualLink] = {}
        self.accepted = 0
        self.refused = 0
        self.throttled = 0  # Mosquitto has no per-source limit (docs/broker.md): nothing is closed at accept
        self._control: dict[str, tuple[dict[str, Any], asyncio.Future[None]]] = {}
        self._kicked: dict[str, float] = {}  # client id -> when the box last had Mosquitto disconnect it
        self._corr = itertools.count(1)
        self.child = MosquittoChild(settings.child, load_devices, self._child_started) if settings.child else None
        self.session: MqttSession = None  # type: ignore[assignment]  # built in start()
        self.lanes: list[MqttSession] = []  # the session first, then the other PUBLISH_LANES - 1 connections

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.child is not None:
            await self.child.start()  # calls _child_started, which builds and starts the session
        else:
            host, port, user, password, tls = parse_url(self.settings.url)
            self._open_session(host, port, user, password, ssl.create_default_context() if tls else None)
        try:
            await asyncio.wait_for(asyncio.gather(*(lane.connected.wait() for lane in self.lanes)), 10)
        except asyncio.TimeoutError:
            raise RuntimeError(f"cannot log in to the broker at {self.session.host}:{self.session.port} "
                               "as intrapush's privileged client") from None

    def _open_session(self, host: str, port: int, user: str, password: str, ctx: ssl.SSLContext | None) -> None:
        self.session = MqttSession(host, port, "intrapush-box", user, password, on_message=self._on_message,
                                   on_connected=self._on_connected, on_lost=self._on_lost,
                                   subscriptions=SUBSCRIPTIONS, ssl_context=ctx)
        # Mosquitto reads one packet per socket per turn of its loop: pushes (and our PUBACKs for acks) spread
        # over several connections reach it several per turn.
        self.lanes = [self.session] + [
            MqttSession(host, port, f"intrapush-box-{n}", user, password, on_message=self._on_message,
                        on_connected=_ignore_connected, on_lost=self._on_lost, subscriptions=[ACKS], ssl_context=ctx)
            for n in range(1, PUBLISH_LANES)]
        for lane in self.lanes:
            lane.start()

    def lane_for(self, client_id: str) -> MqttSession:
        return self.lanes[hash(client_id) % len(self.lanes)]

    def _child_started(self, password: str) -> None:
        assert self.settings.child is not None
        if self.session is None:
            self._open_session("127.0.0.1", self.settings.child.internal_port, ADMIN_USER, password, None)
        else:  # a restarted child has a new admin password and none of our sessions
            for lane in self.lanes:
                lane.password = password
                lane.reconnect_now()

    async def shutdown(self) -> None:
        for link in list(self.links.values()):
            self.drop_link(link, "shutdown")
        for lane in self.lanes:
            await lane.close()
        if self.child is not None:
            await self.child.stop()
        for _, future in self._control.values():
            if not future.done():
                future.cancel()

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        if self.settings.child is not None:
            return {li.name: (li.host, li.port) for li in self.settings.child.listeners}
        host, port, _, _, tls = parse_url(self.settings.url)
        return {"mqtt-tls" if tls else "mqtt": (host, port)}

    def reload_tls(self) -> None:
        """The box's certificate files changed (renewal, revocation, CA rotation): Mosquitto re-reads them.
        An external broker manages its own."""
        if self.child is not None:
            self.child.reload()

    # -- the privileged connection -----------------------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        if not session_present:
            # A new broker session (first start, or the broker restarted): nobody we knew is connected.
            for link in list(self.links.values()):
                self.drop_link(link, "broker restarted")
        for corr, (command, _) in self._control.items():
            self._send_control(corr, command)  # answers lost with the old session: ask again

    def _on_lost(self) -> None:
        return None  # a short loss resumes the session; a broker restart shows as session_present=False

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.startswith("push/"):
            if retain:
                return  # a retained hello replayed at our SUBSCRIBE says nothing about now
            client_id, _, kind = topic[5:].rpartition("/")
            link = self.links.get(client_id)
            if kind == "status":
                if link is not None:
                    self.drop_link(link, "last will")
                return
            if link is None:
                if kind == "ack":
                    # Acks come over any of our connections, so one may overtake the log line of its
                    # device's connection or trail that of its disconnection: recorded, but no link.
                    device = self.gate.identify(client_id)
                    if device is not None:
                        self.gate.handle_detached_ack(device, client_id, payload)
                    return
                link = self._open_link(client_id, "?")
                if link is None:
                    return
            if kind == "hello":
                link.subscribed = True  # the protocol says hello after subscribing
            self.gate.handle_publish(link, kind, payload)
        elif topic.startswith(LOG_PREFIX):
            self._on_log(topic[len(LOG_PREFIX):], payload.decode("utf-8", "replace"))
        elif topic == CONTROL_RESPONSE:
            self._on_control_response(payload)

    def _on_log(self, level: str, text: str) -> None:
        line = text.split(": ", 1)[-1]
        if level in ("N", "E"):
            if line.startswith("New client connected from "):
                m = _CONNECTED.match(line)
                if m is not None:
                    self._on_connect_line(m.group(2), m.group(1), int(m.group(3)))
            elif line.startswith("Client "):
                client_id, _, rest = line[7:].partition(" ")
                if rest.startswith(_GONE):
                    if client_id == "<unknown>":
                        self.refused += 1
                    link = self.links.get(client_id)
                    if link is not None:
                        self.drop_link(link, "taken over" if rest.startswith("already") else rest.rstrip("."))
            elif line.startswith("Socket error on client "):
                link = self.links.get(line[23:].split(",", 1)[0])
                if link is not None:
                    self.drop_link(link, "socket error")
        elif level == "M/subscribe":
            client_id, _, rest = line.partition(" ")
            link = self.links.get(client_id)
            if link is not None and rest.partition(" ")[2] == topics.inbox_topic(client_id):
                link.subscribed = True
        elif level == "U/unsubscribe":
            client_id, _, topic = line.partition(" ")
            link = self.links.get(client_id)
            if link is not None and topic == topics.inbox_topic(client_id):
                link.subscribed = False

    def _on_connect_line(self, client_id: str, peer: str, keepalive: int) -> None:
        link = self._open_link(client_id, peer)
        if link is None:
            return
        self.accepted += 1
        if keepalive == 0 or keepalive > self.settings.max_keepalive_s:
            # Mosquitto 2.0.11 accepts it from an MQTT 3.1.1 client; such a connection is never timed out.
            log.warning("event=keepalive_unbounded client=%s keepalive=%d max=%d", client_id, keepalive,
                        self.settings.max_keepalive_s)
        log.info("event=connected client=%s addr=%s keepalive=%d", client_id, peer, keepalive)

    def _open_link(self, client_id: str, peer: str) -> VirtualLink | None:
        principal = self.gate.identify(client_id)
        if principal is None:
            return None  # intrapush itself, or a login the directory no longer knows
        older = self.links.get(client_id)
        if older is not None:
            self.drop_link(older, "taken over")
        link = VirtualLink(self, client_id, principal, peer)
        self.links[client_id] = link
        self.gate.handle_connected(link)
        return link

    def drop_link(self, link: VirtualLink, reason: str) -> None:
        if link.closed:
            return
        link.closed = True
        link.close_reason = reason
        if self.links.get(link.client_id) is link:
            del self.links[link.client_id]
        try:
            self.gate.handle_disconnected(link, reason)
        except Exception:
            log.exception("event=disconnect_hook_failed client=%s", link.client_id)

    # -- device logins (dynamic security) ------------------------------------------------------------
    async def add_device(self, client_id: str, password: str) -> None:
        """The device's role (its own topics) and its login, in one message: the role first."""
        role = device_role_name(client_id)
        await self._run_control({"command": "createRole", "rolename": role, "acls": device_acls(client_id)},
                                {"command": "createClient", "username": client_id, "clientid": client_id,
                                 "password": password, "roles": [{"rolename": role}]})

    def kick(self, client_id: str) -> None:
        """Disconnect a device's connection, its login kept: disabling a client makes Mosquitto close its
        connection, and enabling it KICK_HOLD_S later lets the device log in again. Meanwhile its floods
        stop at Mosquitto instead of coming through the relay (#10). (A restart re-enables it: the
        dynamic-security file is written afresh from the store.)"""
        loop = asyncio.get_running_loop()
        now = loop.time()
        kicked = self._kicked
        if kicked.get(client_id, -KICK_HOLD_S) > now - KICK_HOLD_S:
            return  # already held: no command per message of a flood
        kicked[client_id] = now
        if len(kicked) > 10000:
            del kicked[next(iter(kicked))]
        self._control_later(client_id, "disableClient")
        loop.call_later(KICK_HOLD_S, self._control_later, client_id, "enableClient")

    def _control_later(self, client_id: str, command: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run_control({"command": command, "username": client_id}))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.info("event=kick_failed client=%s command=%s error=%r", client_id, command,
                                        t.exception()))

    async def remove_device(self, client_id: str) -> None:
        """Delete the login, then its role; Mosquitto disconnects a client logged in with it."""
        await self._run_control({"command": "deleteClient", "username": client_id},
                                {"command": "deleteRole", "rolename": device_role_name(client_id)})

    async def _run_control(self, *commands: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        pending = []
        for command in commands:
            corr = f"c{next(self._corr)}"
            future: asyncio.Future[None] = loop.create_future()
            self._control[corr] = (command, future)
            pending.append((corr, command, future))
        body = json.dumps({"commands": [{**command, "correlationData": corr} for corr, command, _ in pending]})
        self.session.publish(topic_header(CONTROL), body.encode())
        names = "+".join(command["command"] for _, command, _ in pending)
        try:
            answers = await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for _, _, f in pending),
                                                            return_exceptions=True), CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the broker did not answer {names} in {CONTROL_TIMEOUT_S:g} s") from None
        finally:
            for corr, _, _ in pending:
                self._control.pop(corr, None)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer

    def _send_control(self, corr: str, command: dict[str, Any]) -> None:
        body = json.dumps({"commands": [{**command, "correlationData": corr}]}).encode()
        self.session.publish(topic_header(CONTROL), body)

    def _on_control_response(self, payload: bytes) -> None:
        try:
            responses = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("event=bad_control_response")
            return
        for response in responses:
            entry = self._control.get(response.get("correlationData", ""))
            if entry is None or entry[1].done():
                continue
            command, future = entry
            error = response.get("error")
            if error and error != _HARMLESS_ERRORS.get(command["command"]):
                log.error("event=broker_credentials_failed command=%s client=%s error=%r", command["command"],
                          command.get("username"), error)
                future.set_exception(RuntimeError(f"{command['command']} refused by the broker: {error}"))
            else:
                future.set_result(None)


def child_listeners(specs: list[Any], tls_files: dict[str, str],
                    client_certs: dict[str, str]) -> tuple[int, list[ChildListener]]:
    """A free port for intrapush's own listener, and our listener specs as Mosquitto listeners (port 0
    resolved to a free port now)."""
    out = []
    picked = iter(free_ports(["127.0.0.1"] + [spec.host for spec in specs if not spec.port]))
    internal = next(picked)
    for spec in specs:
        port = spec.port or next(picked)
        tls = None
        if spec.ssl_context is not None:
            tls = {"certfile": tls_files["certfile"], "keyfile": tls_files["keyfile"]}
            if client_certs.get(spec.name) == "required":
                tls.update(cafile=tls_files["cafile"], crlfile=tls_files["crlfile"], require_certificate="true",
                           # The certificate is the login: its CN (the client id it was issued for) becomes the
                           # username, hence its dynamic-security role, and the client id. Mosquitto then skips the password.
                           use_identity_as_username="true", use_username_as_clientid="true")
        out.append(ChildListener(spec.name, spec.host, port, tls, auto_port=not spec.port))
    return internal, out


def from_config(cfg: Any, specs: list[Any], gate: DeviceGate,
                load_devices: Callable[[], Awaitable[list[tuple[str, str | None]]]], cert_store: Any) -> MosquittoBroker:
    """The backend `[broker] backend = "mosquitto"` asks for, or StartupError saying what to change."""
    b = cfg.broker
    problems = []
    for spec in specs:
        key = {"mqtt-wss": "broker.wss_listen", "mqtt-ws": "broker.ws_listen"}.get(spec.name)
        if key is None:
            continue
        if cfg.sources[key] != "default":
            problems.append(f"`{key}`: Debian's Mosquitto 2.0.11 has no WebSocket listener; set it to \"\" "
                            "with backend = \"mosquitto\" (browsers need the embedded backend)")
        else:
            log.info("event=listener_skipped name=%s reason=%r", spec.name, "no WebSocket in Debian's Mosquitto")
    tcp = [spec for spec in specs if spec.kind == "tcp"]
    child = None
    if not b.url:
        if shutil.which(b.mosquitto_bin) is None:
            problems.append(f"`broker.mosquitto_bin`: {b.mosquitto_bin!r} not found (apt-get install mosquitto)")
        if not Path(b.mosquitto_plugin).exists():
            problems.append(f"`broker.mosquitto_plugin`: {b.mosquitto_plugin} not found (Debian's mosquitto ships it)")
        for spec in tcp:
            if spec.client_cert == "optional":
                problems.append(f"`broker.tls_client_cert` = \"optional\": Mosquitto checks client certificates "
                                "always or never; use \"required\" or \"none\"")
        if not tcp:
            problems.append("no MQTT listener for devices: set broker.tls_listen or broker.listen")
    if problems:
        raise StartupError("; ".join(problems))
    if not b.url:
        directory = cfg.data_dir / "mosquitto"
        files = {"certfile": str(cert_store.server_pem), "keyfile": str(cert_store.server_key),
                 "cafile": str(directory / CA_BUNDLE), "crlfile": str(directory / CRL_BUNDLE)}
        client_certs = {spec.name: spec.client_cert for spec in tcp}
        internal, listeners = child_listeners(tcp, files, client_certs)
        # During a CA rotation the previous CA's device certificates stay trusted, as on the embedded backend.
        trust = TrustSources((cert_store.ca_pem, cert_store.previous_ca.cert),
                             (cert_store.crl_pem, cert_store.previous_ca.crl))
        # Without a cap, enough connections from one peer exhaust Mosquitto's files, and then it can accept
        # nobody, intrapush's own links included (#10): 0 derives the cap from the file limit it runs with.
        file_limit = child_file_limit()
        max_connections = b.max_connections or derived_max_connections(file_limit, len(listeners), PUBLISH_LANES)
        log.info("event=mosquitto_limits file_limit=%d max_connections=%d listeners=%d source=%s", file_limit,
                 max_connections, len(listeners), "config" if b.max_connections else "derived")
        child = ChildSettings(directory=directory, listeners=listeners,
                              max_packet_bytes=b.max_packet_bytes, max_keepalive_s=b.max_keepalive_s,
                              max_queued_bytes=b.max_write_buffer_bytes, max_connections=max_connections,
                              binary=b.mosquitto_bin, plugin=b.mosquitto_plugin, internal_port=internal,
                              trust=trust if "required" in client_certs.values() else None, file_limit=file_limit)
    return MosquittoBroker(MosquittoSettings(child, b.url, b.max_keepalive_s), gate, load_devices)


__all__ = ["MosquittoBroker", "MosquittoSettings", "VirtualLink", "child_listeners", "from_config", "parse_url"]
