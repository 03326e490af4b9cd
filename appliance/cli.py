"""The `intrapush` command: serve, config, app, device."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config import BY_NAME, CONFIG_FILE_NAME, SETTINGS, Config, ConfigError
from appliance.errors import ApiError, ApplianceError
from certs import CertError

DEFAULT_DATA_DIR = "./intrapush-data"


def _fail(title: str, detail: str, code: int = 2) -> int:
    print(f"intrapush: {title}\n{detail}", file=sys.stderr)
    return code


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("INTRAPUSH_DATA_DIR") or DEFAULT_DATA_DIR).resolve()


def _load_config(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> Config:
    config_file = Path(args.config) if getattr(args, "config", None) else None
    return Config.load(_data_dir(args), file=config_file, flags=flags)


# -- serve ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from appliance import datadir
    from appliance.daemon import Daemon
    from appliance.logs import setup_logging

    data_dir = _data_dir(args)
    lock = datadir.claim(data_dir)  # first, before anything is touched: one daemon per data directory (#9)
    try:
        os.umask(0o077)  # everything the daemon creates (database, run.json, sockets) is its user's alone
        datadir.secure(data_dir)
        datadir.prepare(data_dir, write_config=not getattr(args, "config", None))
        flags = {}
        if args.http_listen is not None:
            flags["api.listen"] = args.http_listen
        if args.mqtt_listen is not None:
            flags["broker.listen"] = args.mqtt_listen
        cfg = _load_config(args, flags)
        datadir.secure(data_dir, data_dir / CONFIG_FILE_NAME, *datadir.store_files(cfg.path("store.path")))
        setup_logging(cfg.log.level, cfg.log.format, cfg.log.overrides)
        try:
            import uvloop  # a dependency on Linux; plain asyncio elsewhere
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(Daemon(cfg).run())
    finally:
        lock.release()
    return 0


# -- config --------------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    rows = []
    for s in SETTINGS:
        value = cfg.values[s.name]
        rows.append({"key": s.name, "value": "***" if s.secret and value else value, "source": cfg.sources[s.name]})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["key"]) for r in rows)
        for r in rows:
            print(f"{r['key']:<{width}}  {json.dumps(r['value'])}  ({r['source']})")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from appliance.daemon import build_fallback_senders

    cfg = _load_config(args)
    senders = build_fallback_senders(cfg)  # the transports' own settings are checked here
    asyncio.run(_close_all(senders))
    print(f"{cfg.file}: ok ({len(BY_NAME)} settings; fallback: {', '.join(senders) or 'off'})")
    return 0


async def _close_all(senders: dict[str, Any]) -> None:
    for sender in senders.values():
        await sender.aclose()


def cmd_fallback_test(args: argparse.Namespace) -> int:
    """Send one test message through the configured transport and report what happened."""
    from appliance.daemon import build_fallback_senders
    from fallback.base import FallbackError, Notice

    cfg = _load_config(args)
    sender = build_fallback_senders(cfg).get(args.channel)
    if sender is None:
        return _fail(f"no {args.channel} transport is configured", f"set fallback.{args.channel}.transport", 2)
    notice = Notice(args.channel, args.to, args.text, reference="test:cli",
                    subject="intrapush test message" if args.channel == "email" else None)

    async def send() -> Any:
        try:
            return await sender.send(notice)
        finally:
            await sender.aclose()

    try:
        receipt = asyncio.run(send())
    except FallbackError as exc:
        kind = "temporary" if exc.temporary else "permanent"
        doc = {"ok": False, "failure": kind, "reason": exc.reason, "detail": exc.detail}
        _print(args, doc, f"{args.channel} test failed ({kind}): {exc.reason} {exc.detail}")
        return 1
    doc = {"ok": True, "transport": receipt.transport, "message_ids": list(receipt.message_ids),
           "parts": receipt.parts}
    _print(args, doc, f"{args.channel} test sent via {receipt.transport}: ids={list(receipt.message_ids)} "
                      f"parts={receipt.parts}")
    return 0


# -- admin operations: through the running daemon's admin socket, else on the store directly -------
ADMIN_WAIT_S = 10.0  # a daemon that holds the lock but is still starting opens its socket within this


class AdminClient:
    """Runs admin operations through the daemon when it runs, else on the database file. "Running" means
    holding the data directory's lock (#9): a daemon we cannot signal or whose socket we cannot open is
    still running, and its database is never written from here."""

    def __init__(self, data_dir: Path, load_config: Callable[[], Config]) -> None:
        self.data_dir = data_dir
        self.load_config = load_config  # after the lock: the lock file is readable where the config may not be
        self.socket = data_dir / "admin.sock"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import http.client
        import socket

        class UnixConnection(http.client.HTTPConnection):
            def __init__(self, path: str) -> None:
                super().__init__("localhost", timeout=30)
                self.unix_path = path

            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.unix_path)

        deadline = time.monotonic() + ADMIN_WAIT_S
        while True:
            conn = UnixConnection(str(self.socket))
            try:
                conn.connect()
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                conn.close()
                if time.monotonic() >= deadline:
                    raise self._unreachable(exc) from None
                time.sleep(0.2)
            except OSError as exc:  # PermissionError: the socket is another user's
                raise self._unreachable(exc) from None
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read() or b"null")
        if resp.status >= 400:
            raise SystemExit(_fail(f"the daemon refused: {doc.get('error')}", json.dumps(doc), 1))
        return doc

    def _unreachable(self, exc: OSError) -> ApplianceError:
        from appliance.datadir import DataDirLock

        pid = DataDirLock(self.data_dir).holder()
        advice = ("run this as the daemon's user" if isinstance(exc, PermissionError)
                  else f"it did not answer within {ADMIN_WAIT_S:g} s; check that it is not stuck starting")
        return ApplianceError(
            f"intrapush (pid {pid if pid is not None else 'unknown'}) holds {self.data_dir}, but its admin socket "
            f"{self.socket} cannot be opened: {exc.strerror or exc}. The database is not touched while a daemon "
            f"holds it: {advice}.")

    def do(self, method: str, path: str, offline: Any, body: dict[str, Any] | None = None) -> Any:
        """Through the daemon when it runs, else `offline(accounts)` on the database, holding the lock."""
        from appliance import datadir

        lock = datadir.open_for_cli(self.data_dir)
        try:
            cfg = self.load_config()
            self.socket = cfg.path("api.admin_socket")
            if lock is None:
                return self.call(method, path, body)
            os.umask(0o077)  # a database created here is as private as the daemon's
            return offline(self.offline(cfg))
        finally:
            if lock is not None:
                lock.release()

    def offline(self, cfg: Config) -> Any:
        from appliance.accounts import OfflineAccounts
        from appliance.store import Store

        from certs import CertStore

        cert_store = CertStore(cfg.path("certs.dir"), passphrase=cfg.certs.ca_passphrase or None)
        return OfflineAccounts(Store(cfg.path("store.path"), cfg.store.synchronous), cert_store)


def _offline_actor() -> str:
    from appliance.api.admin import unix_actor

    return unix_actor(os.getuid()) + " (offline)"


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(_data_dir(args), lambda: _load_config(args))


def _print(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else human)


def cmd_app_create(args: argparse.Namespace) -> int:
    doc = _admin(args).do("POST", "/admin/apps", lambda acc: acc.create_app(args.name, _offline_actor()).as_json(),
                          {"name": args.name})
    _print(args, doc, "\n".join(f"{k}: {v}" for k, v in doc.items()) +
           "\n(the API key and the enrollment secret are shown only now)")
    return 0


def cmd_app_list(args: argparse.Namespace) -> int:
    apps = _admin(args).do("GET", "/admin/apps", lambda acc: acc.list_apps())
    _print(args, apps, "\n".join(f"{a['app_id']}  {a['name']}  devices={a['devices']}" for a in apps) or "no apps")
    return 0


def _until(ts: float | None) -> str:
    if not ts or ts <= time.time():
        return "no longer works"
    return "keeps working until " + dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rotate(args: argparse.Namespace, route: str, field: str, what: str) -> int:
    """Rotate the API key or the enrollment secret; print the new one and until when the previous works."""
    body = {"grace_s": args.grace_s} if args.grace_s is not None else {}
    method = "rotate_key" if field == "api_key" else "rotate_secret"
    doc = _admin(args).do("POST", f"/admin/apps/{args.app}/{route}",
                          lambda acc: getattr(acc, method)(args.app, args.grace_s, _offline_actor()), body)
    _print(args, doc, f"app_id: {doc['app_id']}\n{field}: {doc[field]}\n"
                      f"(shown only now; the previous {what} {_until(doc['previous_valid_until'])})")
    return 0


def cmd_app_rotate(args: argparse.Namespace) -> int:
    return _rotate(args, "rotate-key", "api_key", "key")


def cmd_app_rotate_secret(args: argparse.Namespace) -> int:
    return _rotate(args, "rotate-secret", "enrollment_secret", "secret")


def cmd_app_enrollment(args: argparse.Namespace) -> int:
    required = bool(args.require_ticket)
    doc = _admin(args).do("PUT", f"/admin/apps/{args.app}/enrollment",
                          lambda acc: acc.set_enrollment(args.app, required, _offline_actor()),
                          {"require_ticket": required})
    _print(args, doc, f"{doc['app_id']}: " + ("devices enroll only with a ticket from the app server" if required
                                                else "devices may enroll with the enrollment secret (anonymous)"))
    return 0


def cmd_app_limits(args: argparse.Namespace) -> int:
    def value(raw: str | None) -> float | None:
        return None if raw in (None, "default") else float(raw)

    try:
        body = {"pushes_per_s": value(args.pushes_per_s), "targets_per_min": value(args.targets_per_min)}
    except ValueError:
        return _fail("app set-limits: a limit is a number, 0 (no limit) or `default`", "", 2)
    doc = _admin(args).do("PUT", f"/admin/apps/{args.app}/limits",
                          lambda acc: acc.set_limits(args.app, body["pushes_per_s"], body["targets_per_min"],
                                                     _offline_actor()), body)

    def show(v: float | None) -> str:
        return "the box's default" if v is None else "no limit" if v == 0 else f"{v:g}"

    _print(args, doc, f"{doc['app_id']}: pushes per second: {show(doc['pushes_per_s'])}; "
                      f"targets per minute: {show(doc['targets_per_min'])}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    query = {k: v for k, v in (("app", args.app), ("limit", args.limit), ("before", args.before)) if v is not None}
    entries = _admin(args).do("GET", "/admin/audit" + (f"?{urlencode(query)}" if query else ""),
                              lambda acc: acc.audit(args.app, args.before, args.limit or 100))
    lines = [f"{e['id']:>6}  {dt.datetime.fromtimestamp(e['at'], dt.timezone.utc):%Y-%m-%d %H:%M:%S}  "
             f"{e['actor']:<28} {e['action']:<20} {e['app_id'] or '-'}  {e['subject'] or ''}"
             f"{'  ' + json.dumps(e['detail']) if e['detail'] else ''}" for e in entries]
    _print(args, entries, "\n".join(lines) or "no audit entries")
    return 0


def cmd_app_fallback(args: argparse.Namespace) -> int:
    from appliance.api.provider import validate
    from appliance.api.schemas import AppFallbackRequest

    policy = None
    if not args.off:
        if args.after_s is None or not args.channels:
            return _fail("app set-fallback needs --after-s and --channels (or --off)", "", 2)
        policy = {"after_s": args.after_s, "channels": args.channels.split(",")}
        if args.sms_text:
            policy["sms_text"] = args.sms_text
        if args.email_subject:
            policy["email_subject"] = args.email_subject
        policy = validate(AppFallbackRequest, {"policy": policy}).policy.model_dump()
    doc = _admin(args).do("PUT", f"/admin/apps/{args.app}/fallback",
                          lambda acc: acc.set_app_fallback(args.app, policy, _offline_actor()), {"policy": policy})
    _print(args, doc, f"{doc['app_id']}: fallback {json.dumps(doc['fallback'])}")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    query = f"?app={args.app}" if args.app else ""
    devices = _admin(args).do("GET", f"/admin/devices{query}", lambda acc: acc.list_devices(args.app))
    lines = [f"{d['token']}  {d['platform']:<7} {d['package']}  {d['device_id']}  "
             f"{'retired ' + str(d['retired_reason']) if d['retired_at'] else 'active'}" for d in devices]
    _print(args, devices, "\n".join(lines) or "no devices")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    doc = _admin(args).do("POST", f"/admin/devices/{args.token}/revoke", lambda acc: acc.revoke(args.token, _offline_actor()))
    _print(args, doc, f"revoked {doc['token']}")
    return 0


def cmd_device_simulate(args: argparse.Namespace) -> int:
    from appliance.device import simulate

    if (args.secret is None) == (args.ticket is None):
        return _fail("device simulate needs --secret or --ticket", "--secret enrolls anonymous devices; --ticket "
                     "(from POST /v1/enrollment-tickets) enrolls one device bound to the ticket's user", 2)
    credentials = [args.ticket] if args.ticket else [args.secret] * args.devices
    from appliance.device import EnrollmentRefused

    try:
        return asyncio.run(simulate(args.url, args.app_id, credentials, args.seconds, args.platform, args.mqtt_host,
                                    args.cacert))
    except EnrollmentRefused as exc:
        return _fail("the box refused the enrollment", str(exc), 1)


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help=f"data directory (env INTRAPUSH_DATA_DIR; default {DEFAULT_DATA_DIR})")
    common.add_argument("--config", help="config file (default DATA_DIR/intrapush.toml)")
    common.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(prog="intrapush", description="Private push appliance for air-gapped networks")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--http-listen", help="override api.listen (host:port)")
    serve.add_argument("--mqtt-listen", help="override broker.listen (host:port)")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="show or check the configuration").add_subparsers(dest="sub", required=True)
    config.add_parser("show", parents=[common], help="every setting with its value and source").set_defaults(
        func=cmd_config_show)
    config.add_parser("check", parents=[common], help="validate the configuration").set_defaults(func=cmd_config_check)

    app = sub.add_parser("app", help="provider apps").add_subparsers(dest="sub", required=True)
    create = app.add_parser("create", parents=[common], help="create an app; prints its secrets once")
    create.add_argument("name")
    create.set_defaults(func=cmd_app_create)
    app.add_parser("list", parents=[common], help="list apps").set_defaults(func=cmd_app_list)
    rotate = app.add_parser("rotate-key", parents=[common],
                            help="issue a new API key; the previous one keeps working for --grace-s")
    rotate.add_argument("app", help="app id or name")
    rotate.add_argument("--grace-s", type=int, help="seconds the previous key keeps working (default 86400; "
                                                    "0 ends it now, e.g. after a leak)")
    rotate.set_defaults(func=cmd_app_rotate)
    rsecret = app.add_parser("rotate-secret", parents=[common],
                             help="issue a new enrollment secret; the previous one keeps working for --grace-s")
    rsecret.add_argument("app", help="app id or name")
    rsecret.add_argument("--grace-s", type=int, help="seconds the previous secret keeps working (default 2592000, "
                                                     "30 days: apps in the field carry it; 0 ends it now)")
    rsecret.set_defaults(func=cmd_app_rotate_secret)
    enr = app.add_parser("set-enrollment", parents=[common], help="require enrollment tickets, or allow the secret")
    enr.add_argument("app", help="app id or name")
    mode = enr.add_mutually_exclusive_group(required=True)
    mode.add_argument("--require-ticket", action="store_true", help="every enrollment needs a ticket")
    mode.add_argument("--allow-secret", action="store_true", help="anonymous devices may enroll with the secret")
    enr.set_defaults(func=cmd_app_enrollment)

    fb = app.add_parser("set-fallback", parents=[common], help="default SMS/e-mail fallback for the app's pushes")
    fb.add_argument("app", help="app id or name")
    fb.add_argument("--after-s", type=int, help="escalate when not acknowledged after this many seconds")
    fb.add_argument("--channels", help="sms, email or sms,email")
    fb.add_argument("--sms-text", help="fixed SMS text (default: title: body)")
    fb.add_argument("--email-subject", help="fixed e-mail subject (default: the title)")
    fb.add_argument("--off", action="store_true", help="no default fallback")
    fb.set_defaults(func=cmd_app_fallback)

    lim = app.add_parser("set-limits", parents=[common], help="the app's send limits (429 when over)")
    lim.add_argument("app", help="app id or name")
    lim.add_argument("--pushes-per-s", default="default", help="pushes accepted per second; 0: no limit; "
                                                               "default: limits.app_pushes_per_s")
    lim.add_argument("--targets-per-min", default="default", help="devices reached per minute; 0: no limit; "
                                                                  "default: limits.app_targets_per_min")
    lim.set_defaults(func=cmd_app_limits)

    audit = sub.add_parser("audit", parents=[common], help="who created, rotated, revoked or deleted what, newest first")
    audit.add_argument("--app", help="only this app (id or name)")
    audit.add_argument("--limit", type=int, help="at most this many entries (default 100, at most 1000)")
    audit.add_argument("--before", type=int, help="entries older than this entry id (paging)")
    audit.set_defaults(func=cmd_audit)

    fbt = sub.add_parser("fallback", help="SMS and e-mail fallback").add_subparsers(dest="sub", required=True)
    ftest = fbt.add_parser("test", parents=[common], help="send a test message through the configured transport")
    ftest.add_argument("channel", choices=("sms", "email"))
    ftest.add_argument("--to", required=True, help="E.164 phone number or e-mail address")
    ftest.add_argument("--text", default="Test message from intrapush.")
    ftest.set_defaults(func=cmd_fallback_test)

    def with_config(fn: Any) -> Any:
        return lambda args: fn(args, _load_config(args))

    from appliance import cli_certs

    cli_certs.add_commands(sub, common, with_config)

    device = sub.add_parser("device", help="devices").add_subparsers(dest="sub", required=True)
    dlist = device.add_parser("list", parents=[common], help="list device tokens")
    dlist.add_argument("--app", help="only this app (id or name)")
    dlist.set_defaults(func=cmd_device_list)
    revoke = device.add_parser("revoke", parents=[common], help="revoke a token; its connection is closed")
    revoke.add_argument("token")
    revoke.set_defaults(func=cmd_device_revoke)
    sim = device.add_parser("simulate", help="enroll simulated devices, connect them and print what they receive")
    sim.add_argument("--url", default="https://localhost:8443", help="the box's provider API")
    sim.add_argument("--cacert", help="the box's CA (DATA_DIR/certs/ca.pem) to trust for HTTPS")
    sim.add_argument("--app-id", required=True)
    sim.add_argument("--secret", help="the app's enrollment secret (anonymous devices)")
    sim.add_argument("--ticket", help="an enrollment ticket from the app server (one device, bound to its user)")
    sim.add_argument("--devices", type=int, default=1)
    sim.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    sim.add_argument("--platform", default="desktop", choices=("ios", "android", "web", "desktop"))
    sim.add_argument("--mqtt-host", help="override the MQTT host from the enrollment answer")
    sim.set_defaults(func=cmd_device_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return _fail("the configuration is invalid", "\n".join(f"  - {p}" for p in exc.problems))
    except ApiError as exc:
        return _fail(exc.kind.message, str(exc), 1)
    except ApplianceError as exc:
        return _fail("cannot continue", str(exc), 1)
    except CertError as exc:
        return _fail(f"certificate operation refused ({type(exc).__name__})", str(exc), 1)
    except PermissionError as exc:
        return _fail("permission denied", f"{exc.filename or ''}: {exc.strerror}; run as the user that owns the data "
                     "directory", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
