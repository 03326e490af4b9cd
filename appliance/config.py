"""Every setting of the appliance, defined once with its default and one line of help.

Precedence: command-line flag > environment `INTRAPUSH_<SECTION>_<KEY>` > `intrapush.toml` > default.
A secret may also come from `INTRAPUSH_<SECTION>_<KEY>_FILE` (the file's content, stripped).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CONFIG_FILE_NAME = "intrapush.toml"
ENV_PREFIX = "INTRAPUSH_"


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env_name(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper().replace('.', '_')}_{self.key.upper()}"


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # --- broker ---------------------------------------------------------------------------------
    # Embedded needs nothing but Python; Mosquitto is for big sites (docs/broker.md).
    S("broker", "backend", "embedded", "MQTT broker: the embedded hardened amqtt, or Mosquitto (a supervised child, or `url`)",
      choices=("embedded", "mosquitto")),
    S("broker", "url", "", "mosquitto backend: an external broker, mqtt[s]://user:password@host:port; empty runs Mosquitto as a child",
      secret=True),
    S("broker", "mosquitto_bin", "mosquitto", "mosquitto backend: the Mosquitto program run as a child"),
    S("broker", "mosquitto_plugin", "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
      "mosquitto backend: Mosquitto's dynamic-security plugin (device logins)"),
    S("broker", "tls_listen", "0.0.0.0:8883", "MQTT over TLS listener, host:port; empty turns it off"),
    S("broker", "wss_listen", "0.0.0.0:8884", "MQTT over secure WebSocket (browsers), host:port; empty turns it off"),
    S("broker", "listen", "", "plain MQTT listener (no TLS, trusted networks only); empty turns it off"),
    S("broker", "ws_listen", "", "plain MQTT over WebSocket listener (no TLS); empty turns it off"),
    S("broker", "tls_client_cert", "none", "device certificates on tls_listen: none, optional (checked if sent) or required",
      choices=("none", "optional", "required")),
    S("broker", "wss_client_cert", "none", "device certificates on wss_listen: none, optional or required",
      choices=("none", "optional", "required")),
    S("broker", "public_host", "", "host name devices are told to connect to; empty: the host the device enrolled through"),
    S("broker", "public_port", 0, "MQTT port devices are told to connect to; 0: the port of `listen`", minimum=0, maximum=65535),
    # Keepalives: short where the OS gives the radio for free (Wi-Fi LPC on iOS), long on cellular Android.
    S("broker", "keepalive_ios_s", 60, "keepalive recommended to iOS devices (Local Push Connectivity)", minimum=10, maximum=3600),
    S("broker", "keepalive_android_s", 240, "keepalive recommended to Android devices; longer saves battery", minimum=10, maximum=3600),
    S("broker", "keepalive_web_s", 45, "keepalive recommended to browsers (proxies cut idle WebSockets)", minimum=10, maximum=3600),
    S("broker", "keepalive_desktop_s", 120, "keepalive recommended to desktop clients", minimum=10, maximum=3600),
    S("broker", "max_keepalive_s", 1200, "longest keepalive accepted; a client asking 0 or more is timed out at this", minimum=10, maximum=65535),
    S("broker", "keepalive_grace", 1.5, "a silent client is closed after keepalive x this factor (MQTT 3.1.1 says 1.5)", minimum=1.0, maximum=5.0),
    S("broker", "connect_timeout_s", 10.0, "a connection that sends no complete CONNECT within this is closed", minimum=0.1, maximum=300),
    # Pushes are small (4 KiB payload cap); a cap far above that stops memory exhaustion by one client.
    S("broker", "max_packet_bytes", 65536, "largest MQTT packet accepted from a client; larger closes the connection", minimum=256, maximum=268435455),
    S("broker", "max_write_buffer_bytes", 1048576, "unsent bytes queued for one client before it is dropped as too slow", minimum=4096),
    S("broker", "max_connections", 0, "most simultaneous MQTT connections per listener; 0 is no limit (Mosquitto: "
      "derived from the file limit)", minimum=0),
    # Per source address (#10). A NAT or a VPN concentrator may put a whole site behind one address: with a
    # burst of 100 and 20/s, 1,000 devices coming back behind one address are all in within 45 s, while one
    # hostile address opens no more than 20 connections a second.
    S("broker", "connect_rate_per_source", 20.0, "embedded backend: new MQTT connections per second from one source "
      "address (IPv6: one /64), beyond the burst; 0 is no limit", minimum=0),
    S("broker", "connect_burst_per_source", 100, "embedded backend: new MQTT connections one source address may open "
      "at once before connect_rate_per_source applies", minimum=1),
    # Off: only the site knows how many devices share an address behind its NATs; any fixed number would lock
    # out the devices of a large one. The rate above and max_connections still bound one source.
    S("broker", "max_connections_per_source", 0, "embedded backend: most simultaneous MQTT connections from one "
      "source address (IPv6: one /64); 0 is no limit", minimum=0),
    # Loopback only: a TLS proxy or a load generator on the box itself brings every device from one of these.
    S("broker", "connect_limit_exempt", "127.0.0.1,::1", "comma-separated source addresses the per-source limits "
      "never apply to"),
    # --- api ------------------------------------------------------------------------------------
    S("api", "tls_listen", "0.0.0.0:8443", "provider and enrollment API over HTTPS, host:port; empty turns it off"),
    S("api", "listen", "", "provider API over plain HTTP (trusted networks only), host:port; empty turns it off"),
    S("api", "admin_socket", "admin.sock", "admin API Unix socket, relative to the data directory"),
    S("api", "max_body_bytes", 2097152, "largest HTTP request body accepted", minimum=1024),
    S("api", "max_batch", 500, "most messages in one POST /v1/messages", minimum=1, maximum=10000),
    S("api", "max_tokens", 10000, "most tokens in one message's `to.tokens`", minimum=1, maximum=100000),
    # The HTTP edge (#16). A provider on the LAN sends a request head in milliseconds; 10 s is slack for
    # a loaded box, and short enough that slow-drip clients cannot hold sockets for minutes.
    S("api", "header_timeout_s", 10.0, "a connection must complete its TLS handshake, and each request head, within this (from connect or from its previous answer)",
      minimum=0.05, maximum=3600),
    S("api", "body_timeout_s", 30.0, "a request body must arrive in full within this; else 408", minimum=0.05, maximum=3600),
    S("api", "max_connections", 1024, "most open HTTP connections per API listener; more get 503", minimum=1),
    # App servers pool a few connections each; 64 leaves room for a busy one and stops one address holding them all.
    S("api", "max_connections_per_address", 64, "most open HTTP connections from one source address; more get 429", minimum=1),
    S("api", "max_header_bytes", 8190, "longest request line or header line; longer gets 431", minimum=1024, maximum=65536),
    # An answer naming every unknown token of a big batch ran to 16 MB (#16); 1,000 is plenty to prune by.
    S("api", "max_unregistered_listed", 1000, "most `unregistered` entries listed in one answer; the rest are counted in `unregistered_omitted`",
      minimum=1),
    # --- push -----------------------------------------------------------------------------------
    # A week covers a long weekend plus holidays; FCM allows 28 days, which is our ceiling.
    S("push", "default_ttl_s", 604800, "lifetime of a push that gives no ttl_s", minimum=0),
    S("push", "max_ttl_s", 2419200, "longest ttl_s a provider may ask for", minimum=0),
    # APNs and FCM both cap at 4 KiB; phones' notification UIs show far less.
    S("push", "max_payload_bytes", 4096, "largest push (title + body + data + collapse key, as JSON)", minimum=256, maximum=65536),
    S("push", "inbox_limit", 1000, "pending pushes kept per device; older ones are dropped and the device told to resync", minimum=1),
    S("push", "status_detail_limit", 100, "GET /v1/messages/{id} lists per-token states up to this many targets", minimum=0),
    S("push", "expiry_sweep_s", 30.0, "how often expired pushes are marked expired", minimum=0.05),
    # --- store ----------------------------------------------------------------------------------
    S("store", "path", "intrapush.db", "SQLite database, relative to the data directory"),
    # FULL fsyncs the WAL at every commit: a 202 survives power loss, not only a crash.
    S("store", "synchronous", "full", "SQLite synchronous mode", choices=("full", "normal")),
    S("store", "max_group", 256, "most queued writes committed in one transaction", minimum=1, maximum=100000),
    S("store", "retention_days", 30, "finished deliveries (acked, expired, cancelled) are purged after this", minimum=1),
    # --- certs ----------------------------------------------------------------------------------
    S("certs", "dir", "certs", "the box's CA, server certificate and CRL, relative to the data directory"),
    S("certs", "names", "", "comma-separated host names and IPs the server certificate covers; empty: this host's names and loopback"),
    S("certs", "ca_passphrase", "", "encrypts the CA key at rest; empty stores it unencrypted (mode 0600)", secret=True),
    S("certs", "key_type", "ec-p256", "key type of new certificates (RSA for old clients)", choices=("ec-p256", "rsa-2048", "rsa-3072")),
    # Let's Encrypt renews 30 days ahead: time to notice and fix a failure before expiry.
    S("certs", "renew_before_days", 30, "renew the server certificate this long before it expires", minimum=1, maximum=365),
    S("certs", "check_interval_s", 2.0, "how often certificate and CRL files are checked for changes (revocation, renewal)", minimum=0.1),
    # --- fallback -------------------------------------------------------------------------------
    S("fallback", "max_attempts", 8, "tries per (push, device, channel) on temporary failures before giving up", minimum=1, maximum=100),
    S("fallback", "retry_initial_s", 30.0, "first retry delay after a temporary failure; doubles each try", minimum=0.01),
    S("fallback", "retry_max_s", 3600.0, "longest retry delay", minimum=0.01),
    S("fallback.sms", "transport", "", "SMS transport; empty turns SMS fallback off", choices=("", "modem", "smpp", "kannel", "http")),
    # A GSM modem sends about one SMS in 3-6 s; 30/min keeps it and the SIM's fair-use limits safe.
    S("fallback.sms", "rate_per_min", 30.0, "most SMS started per minute; a burst waits in the store", minimum=0.01),
    S("fallback.email", "transport", "", "e-mail transport; empty turns e-mail fallback off", choices=("", "smtp")),
    S("fallback.email", "rate_per_min", 120.0, "most e-mails started per minute; a burst waits in the store", minimum=0.01),
    # --- limits ---------------------------------------------------------------------------------
    # Off by default: one box usually serves a few known apps; a site that hosts many sets these so that one
    # app's burst cannot take the writer from the others (per app: `intrapush app set-limits`).
    S("limits", "app_pushes_per_s", 0.0, "pushes one app may send per second (429 beyond); 0 is no limit", minimum=0),
    S("limits", "app_targets_per_min", 0.0, "devices one app's pushes may reach per minute (429 beyond); 0 is no limit",
      minimum=0),
    # Per device connection (#10). A phone acks each push as it shows it: a full inbox (1,000) caught up
    # and acked one by one costs 2,000, which fits the burst twice over; 100 a second sustained is far
    # beyond any app, and holds a flood of 1,000-id acks or of replaying hellos to 100 rows a second each.
    S("limits", "device_ack_ids_max", 100, "ids read from one device ack; further ids are ignored (the push comes again)",
      minimum=1, maximum=1000),
    S("limits", "device_messages_per_s", 100.0, "a device's messages per second: a hello costs 1 plus 1 per push it makes the box resend, an ack 1 per id; the excess is dropped",
      minimum=0.01),
    S("limits", "device_messages_burst", 5000.0, "device messages allowed at once above the rate; a device over it that keeps on for another second's worth is disconnected",
      minimum=1),
    S("limits", "catch_up_page", 200, "pending pushes read per trip to the store while catching a device up", minimum=1,
      maximum=10000),
    # --- log ------------------------------------------------------------------------------------
    S("log", "level", "info", "log level", choices=("debug", "info", "warning", "error")),
    S("log", "format", "text", "log format", choices=("text", "json")),
    S("log", "overrides", "", "per-logger levels, e.g. `appliance.broker=debug,amqtt=warning`"),
    # --- metrics --------------------------------------------------------------------------------
    # Loopback: counters of traffic and devices are nobody's business off the box until the operator
    # binds this to a management address. 9464 is the port Prometheus exporters of OpenTelemetry use.
    S("metrics", "listen", "127.0.0.1:9464", "Prometheus GET /metrics over plain HTTP, host:port; empty turns it off"),
)
del S


def _fallback_settings() -> tuple[Setting, ...]:
    """The transports' own keys, defined once in fallback/transports.py (fallback imports nothing of ours)."""
    from fallback.transports import SETTINGS as TRANSPORT_SETTINGS  # noqa: PLC0415

    ours = {(s.section, s.key) for s in SETTINGS}
    return tuple(
        Setting(f"fallback.{t.channel}", t.key, t.default,
                t.help + (f" ({t.transport}; required)" if t.required else f" ({t.transport})" if t.transport else ""),
                choices=t.choices, secret=t.secret)
        for t in TRANSPORT_SETTINGS if (f"fallback.{t.channel}", t.key) not in ours
    )


SETTINGS = SETTINGS + _fallback_settings()
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


class ConfigError(Exception):
    """The configuration has problems; `problems` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _coerce(setting: Setting, raw: Any, from_text: bool) -> Any:
    """Turn a raw value into the setting's type, or raise ValueError with a readable reason."""
    kind = type(setting.default)
    value: Any
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif from_text and str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = str(raw).lower() in ("1", "true", "yes", "on")
        else:
            raise ValueError(f"expected true or false, got {raw!r}")
    elif kind is int:
        if isinstance(raw, bool) or not (isinstance(raw, int) or from_text):
            raise ValueError(f"expected a whole number, got {raw!r}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {raw!r}") from None
    elif kind is float:
        if isinstance(raw, bool) or not (isinstance(raw, (int, float)) or from_text):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {raw!r}") from None
    else:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}")
        value = raw
    if setting.choices is not None and value not in setting.choices:
        raise ValueError(f"expected one of {', '.join(setting.choices)}, got {value!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(f"must be at least {setting.minimum:g}, got {value!r}")
    if setting.maximum is not None and value > setting.maximum:
        raise ValueError(f"must be at most {setting.maximum:g}, got {value!r}")
    return value


def parse_listen(value: str) -> tuple[str, int] | None:
    """`host:port` (IPv6 as `[::1]:port`) to a pair; empty string means the listener is off."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass
class Config:
    """Resolved settings: `cfg.broker.listen`, plus where each value came from."""

    data_dir: Path
    values: dict[str, Any]
    sources: dict[str, str]
    file: Path

    def __getattr__(self, section: str) -> SimpleNamespace:
        if section not in SECTIONS:
            raise AttributeError(section)
        prefix = section + "."
        return SimpleNamespace(**{k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)})

    def path(self, name: str) -> Path:
        """A path setting resolved against the data directory."""
        p = Path(self.values[name])
        return p if p.is_absolute() else self.data_dir / p

    @classmethod
    def load(
        cls,
        data_dir: Path,
        file: Path | None = None,
        env: dict[str, str] | None = None,
        flags: dict[str, Any] | None = None,
    ) -> Config:
        """Resolve every setting; raise ConfigError listing every problem found."""
        env = dict(os.environ) if env is None else env
        file = file or data_dir / CONFIG_FILE_NAME
        problems: list[str] = []
        values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
        sources: dict[str, str] = {s.name: "default" for s in SETTINGS}

        if file.exists():
            try:
                doc = tomllib.loads(file.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
            tables: list[tuple[str, Any]] = []
            for section, table in doc.items():
                if isinstance(table, dict):
                    # [fallback.sms] arrives nested inside [fallback]
                    tables += [(f"{section}.{k}", v) for k, v in table.items() if isinstance(v, dict)]
                    table = {k: v for k, v in table.items() if not isinstance(v, dict)}
                    if not table and section not in SECTIONS:
                        continue
                tables.append((section, table))
            for section, table in tables:
                if section not in SECTIONS or not isinstance(table, dict):
                    problems.append(f"{file}: unknown section [{section}]{_nearest(section, list(SECTIONS))}")
                    continue
                for key, raw in table.items():
                    name = f"{section}.{key}"
                    setting = BY_NAME.get(name)
                    if setting is None:
                        keys = [s.key for s in SETTINGS if s.section == section]
                        problems.append(f"{file}: unknown key `{name}`{_nearest(key, keys)}")
                        continue
                    try:
                        values[name] = _coerce(setting, raw, from_text=False)
                        sources[name] = str(file)
                    except ValueError as exc:
                        problems.append(f"{file}: `{name}` {exc}")

        known_env = {s.env_name: s for s in SETTINGS}
        for var, raw in env.items():
            if not var.startswith(ENV_PREFIX) or var in ("INTRAPUSH_DATA_DIR", "INTRAPUSH_CONFIG"):
                continue
            base, from_file = (var[:-5], True) if var.endswith("_FILE") and var[:-5] in known_env else (var, False)
            setting = known_env.get(base)
            if setting is None:
                problems.append(f"environment: unknown variable {var}{_nearest(var, list(known_env))}")
                continue
            try:
                text = Path(raw).read_text(encoding="utf-8").strip() if from_file else raw
            except OSError as exc:
                problems.append(f"environment: {var}: cannot read {raw}: {exc.strerror}")
                continue
            try:
                values[setting.name] = _coerce(setting, text, from_text=True)
                sources[setting.name] = f"env {var}"
            except ValueError as exc:
                problems.append(f"environment: {var} {exc}")

        for name, raw in (flags or {}).items():
            setting = BY_NAME[name]
            try:
                values[name] = _coerce(setting, raw, from_text=True)
                sources[name] = "flag"
            except ValueError as exc:
                problems.append(f"flag for `{name}`: {exc}")

        for name in ("broker.listen", "broker.ws_listen", "broker.tls_listen", "broker.wss_listen", "api.listen",
                     "api.tls_listen", "metrics.listen"):
            try:
                parse_listen(values[name])
            except ValueError as exc:
                problems.append(f"`{name}` ({sources[name]}): {exc}")
        for address in filter(None, (a.strip() for a in values["broker.connect_limit_exempt"].split(","))):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                problems.append(f"`broker.connect_limit_exempt` ({sources['broker.connect_limit_exempt']}): "
                                f"{address!r} is not an IP address")
        if values["push.default_ttl_s"] > values["push.max_ttl_s"]:
            problems.append("`push.default_ttl_s` is larger than `push.max_ttl_s`")
        if problems:
            raise ConfigError(problems)
        return cls(data_dir=data_dir, values=values, sources=sources, file=file)


def render_default_file() -> str:
    """The annotated config file: every key commented out at its default."""
    lines = [
        "# intrapush configuration.",
        "# Precedence: command-line flag > environment INTRAPUSH_<SECTION>_<KEY> > this file > default.",
        "# Default values are shown; uncomment to change. Reference: docs/config.md",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for s in SETTINGS:
            if s.section == section:
                lines.append(f"# {s.help}")
                lines.append(f"#{s.key} = {_toml_literal(s.default)}")
    return "\n".join(lines) + "\n"


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
