"""Debian's Mosquitto 2.0.11 as a supervised child: its configuration and dynamic-security files (logins
and topic ACLs) generated into the data directory from ours at every start, restarted with back-off if it dies.

The files are rewritten at every start (edits are lost): `mosquitto/mosquitto.conf` and
`mosquitto/dynamic-security.json` (device logins and their roles from the store, so no device is lost across
a restart; Mosquitto rewrites this file itself when devices are added or removed at run time), and with device
certificates `mosquitto/ca-bundle.pem` and `mosquitto/crl-bundle.pem`, rewritten again at every reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from appliance.broker import topics
from appliance.broker.backlog import ACCEPT_BACKLOG, try_deepen_backlog
from appliance.directory import hash_secret_pbkdf2

log = logging.getLogger("appliance.broker")

DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ADMIN_USER = "intrapush"
CA_BUNDLE = "ca-bundle.pem"
CRL_BUNDLE = "crl-bundle.pem"

# The topic ACL is the dynamic-security plugin's, and only its (#9). Mosquitto 2.0.11 consults an acl_file
# before any plugin and lets every SUBSCRIBE through it (it checks only on delivery), so with one a device
# could join intrapush's shared subscription on acks and Mosquitto would hand it, and drop, a share of every
# device's acks. The plugin checks SUBSCRIBE, with the `$share/<group>/` prefix, against roles, and refuses
# anything no role allows (defaultACLAccess). It has no %u/%c patterns, so each device has its own role
# naming its own four topics.
ACK_SHARE = "$share/intrapush/push/+/ack"  # intrapush's shared subscription on acks (all its connections)
ADMIN_ROLE = "intrapush"
DEVICE_ROLE_PREFIX = "device:"
DEFAULT_ACL_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                      "unsubscribe": True}


def _acl(acltype: str, topic: str) -> dict[str, object]:
    return {"acltype": acltype, "topic": topic, "allow": True}


# intrapush reads device messages, its log lines (presence) and the dynamic-security API's answers, and writes
# pushes and dynamic-security commands.
ADMIN_ACLS = [
    _acl("subscribePattern", topics.hello_topic("+")), _acl("subscribePattern", topics.status_topic("+")),
    _acl("subscribePattern", ACK_SHARE), _acl("subscribePattern", "$SYS/broker/log/#"),
    _acl("subscribeLiteral", "$CONTROL/dynamic-security/v1/response"),
    _acl("publishClientReceive", "push/#"), _acl("publishClientReceive", "$SYS/broker/log/#"),
    _acl("publishClientReceive", "$CONTROL/dynamic-security/v1/response"),
    _acl("publishClientSend", topics.inbox_topic("+")), _acl("publishClientSend", "$CONTROL/dynamic-security/v1"),
]


def device_role_name(client_id: str) -> str:
    return DEVICE_ROLE_PREFIX + client_id


def device_acls(client_id: str) -> list[dict[str, object]]:
    """What one device may do: subscribe to and receive its inbox, publish its hello, ack and status."""
    inbox = topics.inbox_topic(client_id)
    return [_acl("subscribeLiteral", inbox), _acl("publishClientReceive", inbox),
            _acl("publishClientSend", topics.hello_topic(client_id)),
            _acl("publishClientSend", topics.ack_topic(client_id)),
            _acl("publishClientSend", topics.status_topic(client_id))]


@dataclass(frozen=True)
class ChildListener:
    name: str
    host: str
    port: int
    tls: dict[str, str] | None = None  # certfile, keyfile, and for client certificates cafile, crlfile
    auto_port: bool = False  # configured as port 0: picked here, picked again if taken meanwhile


@dataclass(frozen=True)
class TrustSources:
    """The box CA's files behind Mosquitto's cafile and crlfile: the current CA, then the previous one
    during a rotation. Mosquitto takes one file of each per listener, so we bundle them; a source that does
    not exist (no previous CA) is left out."""
    cas: tuple[Path, ...]
    crls: tuple[Path, ...]


@dataclass
class ChildSettings:
    directory: Path  # <data dir>/mosquitto
    listeners: list[ChildListener]
    max_packet_bytes: int
    max_keepalive_s: int
    max_queued_bytes: int
    max_connections: int  # per device listener
    binary: str = "mosquitto"
    plugin: str = DYNSEC_PLUGIN
    internal_port: int = 0
    extra: list[str] = field(default_factory=list)
    trust: TrustSources | None = None  # set when a listener requires device certificates
    file_limit: int = 0  # RLIMIT_NOFILE set in the child; 0 leaves ours


def _prepare_child(file_limit: int) -> None:
    """In the child before exec: Linux sends it SIGTERM when intrapush dies, even by kill -9, so no orphan
    Mosquitto keeps the ports (and old logins) after a crash; and its file limit is the one its
    max_connections was derived from (#10)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if file_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))


# Files Mosquitto holds besides client sockets: stdio, epoll, its listening sockets, the dynamic-security file
# as it rewrites it, TLS files read at a reload. 64 is several times what 2.0.11 opens.
FILE_RESERVE = 64


def child_file_limit() -> int:
    """The file limit (RLIMIT_NOFILE) Mosquitto runs with: our hard limit (systemd's LimitNOFILE, 200,000 in
    image/intrapush.service), so the soft limit a shell or a unit left lower does not cap it unseen."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            hard = 1 << 20
    return int(hard)


def derived_max_connections(file_limit: int, device_listeners: int, own_links: int) -> int:
    """`max_connections` per device listener when `broker.max_connections` is 0: the file limit less Mosquitto's
    own files and intrapush's own links, shared out among the device listeners, so that all of them full
    together still leave Mosquitto the files it needs (Mosquitto 2.0.11 counts per listener)."""
    budget = file_limit - FILE_RESERVE - own_links
    return max(1, budget // max(1, device_listeners))


def free_ports(hosts: list[str]) -> list[int]:
    """Ports the kernel considers free now, all different (Mosquitto 2.0 cannot listen on port 0 and
    report the port): every socket stays bound until all are picked."""
    socks = []
    try:
        for host in hosts:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str) -> int:
    return free_ports([host])[0]


def dynsec_client(username: str, pbkdf2: str, clientid: str | None = None,
                  role: str | None = None) -> dict[str, object]:
    """A dynamic-security client entry from `pbkdf2-sha512$<iterations>$<salt b64>$<hash b64>`."""
    scheme, iterations, salt, digest = pbkdf2.split("$")
    if scheme != "pbkdf2-sha512":
        raise ValueError(f"unknown password hash scheme {scheme!r}")
    entry: dict[str, object] = {"username": username, "password": digest, "salt": salt, "iterations": int(iterations)}
    if clientid:
        entry["clientid"] = clientid  # the login only works with this client id
    if role:
        entry["roles"] = [{"rolename": role}]
    return entry


def render_dynsec(admin_password: str, devices: list[tuple[str, str | None]]) -> tuple[str, int]:
    """The dynamic-security file: our admin client and its role, and every device that has a PBKDF2 hash with
    its own role. Returns the JSON and how many devices had none (enrolled before schema 3: they must enroll
    again)."""
    clients = [dynsec_client(ADMIN_USER, hash_secret_pbkdf2(admin_password), role=ADMIN_ROLE)]
    roles: list[dict[str, object]] = [{"rolename": ADMIN_ROLE, "acls": ADMIN_ACLS}]
    missing = 0
    for client_id, pbkdf2 in devices:
        if pbkdf2:
            clients.append(dynsec_client(client_id, pbkdf2, client_id, device_role_name(client_id)))
            roles.append({"rolename": device_role_name(client_id), "acls": device_acls(client_id)})
        else:
            missing += 1
    doc = {"clients": clients, "groups": [], "roles": roles, "defaultACLAccess": DEFAULT_ACL_ACCESS}
    return json.dumps(doc), missing


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # Mosquitto reads the old file or the new one, never half of one


def write_trust_bundles(directory: Path, trust: TrustSources) -> None:
    """`ca-bundle.pem` and `crl-bundle.pem` from the CA files that exist now."""
    for name, sources in ((CA_BUNDLE, trust.cas), (CRL_BUNDLE, trust.crls)):
        parts = []
        for source in sources:
            try:
                parts.append(source.read_bytes().rstrip(b"\n") + b"\n")
            except FileNotFoundError:
                continue  # no previous CA, or it was just retired
        _write_private(directory / name, b"".join(parts))


def render_config(s: ChildSettings) -> str:
    user = getpass.getuser()
    lines = [
        "# generated by intrapush at every start from intrapush.toml: edits are lost",
        "per_listener_settings false",
        "allow_anonymous false",
        # The store is the truth: the broker keeps nothing across restarts; devices say hello again.
        "persistence false",
        f"user {user}",  # stay the user we run as (as root Mosquitto would switch to `mosquitto`)
        f"plugin {s.plugin}",
        f"plugin_opt_config_file {s.directory / 'dynamic-security.json'}",
        f"max_packet_size {s.max_packet_bytes}",
        f"max_keepalive {s.max_keepalive_s}",
        # Per client beyond the 20 in flight; a device that stops reading loses live pushes past this (the
        # store still has them: they come again on its next hello). intrapush itself asks for 65,535 in flight.
        f"max_queued_bytes {s.max_queued_bytes}",
        "max_queued_messages 10000",
        "retain_available true",
        "sys_interval 0",
        "set_tcp_nodelay true",  # else Nagle holds small PUBLISHes until the peer's delayed ACK (40 ms)
        # Presence: connect/disconnect/subscribe lines are published on $SYS/broker/log/#, where intrapush
        # reads them; stderr too, for start-up errors (intrapush logs notices at debug level).
        "log_dest stderr",
        "log_dest topic",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "log_type subscribe", "log_type unsubscribe",
        "connection_messages true",
        "",
        "# intrapush's own connection",
        f"listener {s.internal_port} 127.0.0.1",
    ]
    for listener in s.listeners:
        lines += ["", f"# {listener.name}", f"listener {listener.port} {listener.host}"]
        if s.max_connections:
            lines.append(f"max_connections {s.max_connections}")
        for key, value in (listener.tls or {}).items():
            lines.append(f"{key} {value}")
    lines += s.extra
    return "\n".join(lines) + "\n"


class MosquittoChild:
    """Runs Mosquitto, relays its stderr to our log, restarts it with back-off when it exits."""

    def __init__(self, settings: ChildSettings, load_devices: Callable[[], Awaitable[list[tuple[str, str | None]]]],
                 on_started: Callable[[str], None]) -> None:
        self.settings = settings
        self.load_devices = load_devices
        self.on_started = on_started  # called with the new admin password after each (re)start
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = False
        self._exited: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def write_files(self, devices: list[tuple[str, str | None]]) -> str:
        """Write the config and dynamic-security files; return the admin password they hold."""
        s = self.settings
        s.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = os.urandom(24).hex()
        dynsec, missing = render_dynsec(password, devices)
        if missing:
            log.warning("event=broker_devices_without_credentials count=%d note=%r", missing,
                        "enrolled before this release: they must enroll again to log in to Mosquitto")
        if s.trust is not None:
            write_trust_bundles(s.directory, s.trust)
        for name, text in (("dynamic-security.json", dynsec), ("mosquitto.conf", render_config(s))):
            _write_private(s.directory / name, text.encode())
        (s.directory / "acl").unlink(missing_ok=True)  # an earlier release's acl_file, no longer used (#9)
        return password

    async def start(self) -> None:
        """First start: fail loudly if Mosquitto cannot run or listen."""
        loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        for attempt in range(3):
            password = self.write_files(await self.load_devices())
            self._spawn(loop)
            try:
                await self._wait_listening(loop)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                self._repick_ports()  # a port picked for `:0` was taken before Mosquitto bound it
        self.on_started(password)
        self._task = loop.create_task(self._supervise())

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._exited is not None
        self._exited.clear()
        conf = self.settings.directory / "mosquitto.conf"
        proc = self.proc = subprocess.Popen([self.settings.binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True,
                                            preexec_fn=partial(_prepare_child, self.settings.file_limit))
        exited = self._exited

        def relay() -> None:  # a thread, so a busy event loop never blocks Mosquitto on a full pipe
            assert proc.stderr is not None
            fd, rest = proc.stderr.fileno(), b""
            # A reconnect storm writes three lines per device: read in large chunks and look at a line only
            # when the chunk holds an error or a warning (or at debug level), to leave the GIL to the loop.
            while True:
                chunk = os.read(fd, 1 << 16)
                rest += chunk or b"\n"  # at the end, a last line without its newline
                lines, _, rest = rest.rpartition(b"\n")
                if not chunk and not lines.strip():
                    break
                debug = log.isEnabledFor(logging.DEBUG)
                if not debug and b": Error" not in lines and b": Warning" not in lines:
                    continue
                for raw in lines.split(b"\n"):
                    text = raw.decode("utf-8", "replace").rstrip().split(": ", 1)[-1]
                    if text.startswith(("Error", "Warning")) and "should not be run as root" not in text:
                        log.warning("event=mosquitto_log pid=%d line=%r", proc.pid, text[:300])
                    elif debug:
                        log.debug("event=mosquitto_log pid=%d line=%r", proc.pid, text[:300])
                if not chunk:
                    break
            proc.wait()
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(exited.set)

        threading.Thread(target=relay, name="mosquitto-stderr", daemon=True).start()
        log.info("event=mosquitto_started pid=%d config=%s", proc.pid, conf)

    async def _wait_listening(self, loop: asyncio.AbstractEventLoop, timeout: float = 10.0) -> None:
        assert self.proc is not None and self._exited is not None
        deadline = loop.time() + timeout
        ports = [("127.0.0.1", self.settings.internal_port)] + [(li.host, li.port) for li in self.settings.listeners]
        while loop.time() < deadline:
            if self._exited.is_set():
                raise RuntimeError(f"mosquitto exited with code {self.proc.returncode} at start "
                                   "(its error is logged above as event=mosquitto_log)")
            try:
                for host, port in ports:
                    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
                    _, writer = await asyncio.open_connection(connect_host, port)
                    writer.transport.abort()
                try_deepen_backlog(self.proc.pid, [li.port for li in self.settings.listeners], ACCEPT_BACKLOG)
                return
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {ports} within {timeout:g} s")

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.5
        assert self._exited is not None
        while not self._stopping:
            started = time.monotonic()
            await self._exited.wait()
            if self._stopping:
                return
            code = self.proc.returncode if self.proc else None
            if time.monotonic() - started > 60:
                delay = 0.5  # it ran a good while: restart promptly
            log.error("event=mosquitto_exited code=%s restart_in_s=%.1f", code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                devices = await self.load_devices()
                password = await asyncio.to_thread(self.write_files, devices)
                self._spawn(loop)
                await self._wait_listening(loop)
                self.restarts += 1
                self.on_started(password)
            except Exception as exc:  # noqa: BLE001 - keep supervising; the next exit retries
                log.error("event=mosquitto_restart_failed error=%r", str(exc))
                if self.proc is not None and self.proc.poll() is None:
                    self.proc.kill()

    def _repick_ports(self) -> None:
        s = self.settings
        auto = [li for li in s.listeners if li.auto_port]
        ports = free_ports(["127.0.0.1"] + [li.host for li in auto])
        s.internal_port = ports[0]
        fresh = dict(zip((li.name for li in auto), ports[1:]))
        s.listeners = [ChildListener(li.name, li.host, fresh[li.name], li.tls, True) if li.auto_port else li
                       for li in s.listeners]
        log.warning("event=mosquitto_ports_repicked internal=%d listeners=%s", s.internal_port, fresh)

    def reload(self) -> None:
        """Rebuild the CA and CRL bundles, then SIGHUP: Mosquitto 2.0.11 reloads its server certificate and
        key, cafile and crlfile for new handshakes (renewal, revocation, CA rotation); connections already
        open stay, and so does intrapush's own."""
        if self.settings.trust is not None:
            write_trust_bundles(self.settings.directory, self.settings.trust)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)
            log.info("event=mosquitto_tls_reloaded pid=%d", proc.pid)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        log.info("event=mosquitto_stopped")
