"""`intrapush ca …` and `intrapush cert …`: the box's CA from the command line.

They work on DATA_DIR/certs directly (the certs library locks it); a running daemon picks up every
change (new server certificate, new CRL) at its next file check, without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import certs
from appliance.config import Config
from appliance.store import Store
from appliance.store import devices as sql_devices
from appliance.tls import default_names


def _store(cfg: Config) -> certs.CertStore:
    return certs.CertStore(cfg.path("certs.dir"), passphrase=cfg.certs.ca_passphrase or None)


def _names(cfg: Config) -> list[str]:
    return [n.strip() for n in cfg.certs.names.split(",") if n.strip()] or default_names()


def _emit(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if args.json else human)


def _device_identity(cfg: Config, device: str) -> str:
    """A device token (dt_…) or MQTT client id (d-…) to the client id device certificates carry."""
    if not device.startswith("dt_"):
        return device
    store = Store(cfg.path("store.path"), cfg.store.synchronous)
    try:
        row = store.read_now(sql_devices.find_token, device)
    finally:
        store.close()
    if row is None:
        raise certs.UnknownCert(f"no device with token {device[:12]}…")
    return str(row["client_id"])


def cmd_ca_show(args: argparse.Namespace, cfg: Config) -> int:
    store = _store(cfg)
    if not store.has_ca():
        raise certs.NotSetUp(f"no CA in {store.directory} yet: start the daemon once or run `intrapush ca import`")
    ca_cert = store.load_ca_cert()
    doc = {"ca": certs.describe_ca(store).as_dict(), "ca_pin": "sha256/" + certs.spki_pin(ca_cert),
           "ca_pin_hex": certs.spki_pin_hex(ca_cert), "ca_file": str(store.ca_pem)}
    if store.has_server_cert():
        server = store.load_server_cert()
        doc["server"] = certs.describe(server).as_dict()
        doc["server_pin"] = "sha256/" + certs.spki_pin(server)
    ca = doc["ca"]
    human = "\n".join([
        f"CA:          {ca.get('subject')}",
        f"fingerprint: {ca.get('fingerprint_sha256')}",
        f"expires:     {ca.get('not_after')} ({ca.get('days_left')} days)",
        f"pin:         {doc['ca_pin']}",
        f"file:        {doc['ca_file']}",
    ] + ([f"server:      {doc['server'].get('subject')} sans={','.join(doc['server'].get('sans', []))} "
          f"expires {doc['server'].get('not_after')}", f"server pin:  {doc['server_pin']}"] if "server" in doc else []))
    _emit(args, doc, human)
    return 0


def cmd_ca_export(args: argparse.Namespace, cfg: Config) -> int:
    pem = certs.export_ca_pem(_store(cfg))
    if args.out:
        Path(args.out).write_bytes(pem)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return 0


def cmd_ca_import(args: argparse.Namespace, cfg: Config) -> int:
    store = _store(cfg)
    key_password = Path(args.key_password_file).read_text().strip() if args.key_password_file else None
    ca = certs.import_ca(store, Path(args.cert).read_bytes(), Path(args.key).read_bytes(),
                         key_password=key_password, overwrite=args.force)
    return _after_new_ca(args, cfg, store, ca, "imported")


def cmd_ca_create(args: argparse.Namespace, cfg: Config) -> int:
    store = _store(cfg)
    ca = certs.create_ca(store, key_type=cfg.certs.key_type, overwrite=args.force)
    return _after_new_ca(args, cfg, store, ca, "created")


def _after_new_ca(args: argparse.Namespace, cfg: Config, store: certs.CertStore, ca: Any, verb: str) -> int:
    """A first CA gets a server certificate at once; a rotation keeps the old one until devices trust
    the new CA (docs/certificates.md, "Rotation")."""
    doc: dict[str, Any] = {"ca": certs.describe(ca).as_dict(), "ca_pin": "sha256/" + certs.spki_pin(ca)}
    if store.has_previous_ca():
        human = (f"{verb} CA {ca.subject.rfc4514_string()}; the old CA stays trusted as the previous CA. "
                 "Distribute `intrapush ca export`, then run `intrapush cert server`.")
    else:
        doc["server"] = certs.describe(certs.issue_server_cert(store, _names(cfg), key_type=cfg.certs.key_type)).as_dict()
        human = f"{verb} CA {ca.subject.rfc4514_string()}; issued a server certificate under it"
    _emit(args, doc, human)
    return 0


def cmd_ca_retire_previous(args: argparse.Namespace, cfg: Config) -> int:
    retired = certs.retire_previous_ca(_store(cfg))
    if retired is None:
        _emit(args, {"retired": None}, "there is no previous CA")
        return 0
    _emit(args, {"retired": certs.describe(retired).as_dict()},
          f"retired the previous CA {retired.subject.rfc4514_string()}; its certificates are refused from now on")
    return 0


def cmd_cert_server(args: argparse.Namespace, cfg: Config) -> int:
    names = args.san or _names(cfg)
    cert = certs.issue_server_cert(_store(cfg), names, key_type=cfg.certs.key_type)
    doc = certs.describe(cert).as_dict()
    _emit(args, doc, f"issued server certificate {doc.get('serial')} for {', '.join(names)}; "
                     "a running daemon uses it for new connections within seconds")
    return 0


def _p12_password(args: argparse.Namespace) -> str:
    if args.password_file:
        return Path(args.password_file).read_text().strip()
    if os.environ.get("INTRAPUSH_P12_PASSWORD"):
        return os.environ["INTRAPUSH_P12_PASSWORD"]
    if sys.stdin.isatty():
        first = getpass.getpass("PKCS#12 password: ")
        if first != getpass.getpass("again: "):
            raise certs.BadInput("the passwords differ")
        return first
    raise certs.BadInput("give the PKCS#12 password with --password-file or INTRAPUSH_P12_PASSWORD")


def cmd_cert_device(args: argparse.Namespace, cfg: Config) -> int:
    password = _p12_password(args)
    if len(password) < 8:
        raise certs.BadInput("the PKCS#12 password needs at least 8 characters")
    identity = _device_identity(cfg, args.device)
    device = certs.issue_device_cert(_store(cfg), identity, key_type=cfg.certs.key_type)
    certs.write_pkcs12(Path(args.out), certs.export_pkcs12(device, password, legacy=args.legacy),
                       overwrite=args.force)
    doc = {"device": identity, "out": args.out, **certs.describe(device.cert).as_dict()}
    _emit(args, doc, f"wrote {args.out}: certificate for {identity}, serial {doc.get('serial')}, "
                     f"expires {doc.get('not_after')}")
    return 0


def cmd_cert_revoke(args: argparse.Namespace, cfg: Config) -> int:
    target = args.target
    if target.startswith("dt_"):
        target = _device_identity(cfg, target)
    revoked = certs.revoke(_store(cfg), target)
    doc = [r.to_json() for r in revoked]
    _emit(args, doc, f"revoked {len(revoked)} certificate(s); the CRL is updated and applies to new handshakes")
    return 0


def cmd_cert_list(args: argparse.Namespace, cfg: Config) -> int:
    rows = [s.as_dict() for s in certs.list_certs(_store(cfg), expiring_within_days=cfg.certs.renew_before_days)]
    human = "\n".join(f"{r['serial'][:16]}  {r['kind']:<7} {r['state']:<9} {r['days_left']:>5}d  {r['name']}"
                      for r in rows) or "no certificates issued"
    _emit(args, rows, human)
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser, run: Any) -> None:
    """Register the ca and cert commands; `run(fn)` wraps each with config loading."""
    ca = sub.add_parser("ca", help="the box's certificate authority").add_subparsers(dest="sub", required=True)
    ca.add_parser("show", parents=[common], help="subject, fingerprint, expiry, SPKI pin").set_defaults(
        func=run(cmd_ca_show))
    export = ca.add_parser("export", parents=[common], help="the CA certificate as PEM, for MDM distribution")
    export.add_argument("--out", help="write to this file instead of stdout")
    export.set_defaults(func=run(cmd_ca_export))
    imp = ca.add_parser("import", parents=[common], help="use an operator's CA (e.g. a corporate intermediate)")
    imp.add_argument("--cert", required=True, help="CA certificate (PEM)")
    imp.add_argument("--key", required=True, help="its private key (PEM, may be encrypted)")
    imp.add_argument("--key-password-file", help="file holding the key's password")
    imp.add_argument("--force", action="store_true", help="replace an existing CA (kept as previous until retired)")
    imp.set_defaults(func=run(cmd_ca_import))
    create = ca.add_parser("create", parents=[common], help="create a new CA of the box's own (rotation)")
    create.add_argument("--force", action="store_true", help="replace the existing CA (kept as previous)")
    create.set_defaults(func=run(cmd_ca_create))
    ca.add_parser("retire-previous", parents=[common], help="stop trusting the previous CA after a rotation").set_defaults(
        func=run(cmd_ca_retire_previous))

    cert = sub.add_parser("cert", help="server and device certificates").add_subparsers(dest="sub", required=True)
    server = cert.add_parser("server", parents=[common], help="(re)issue the server certificate")
    server.add_argument("--san", action="append", help="host name or IP (repeat); default: certs.names")
    server.set_defaults(func=run(cmd_cert_server))
    device = cert.add_parser("device", parents=[common], help="a device certificate as a PKCS#12 bundle")
    device.add_argument("device", help="device token (dt_…) or MQTT client id (d-…)")
    device.add_argument("--out", required=True, help="the .p12 file to write")
    device.add_argument("--password-file", help="file holding the bundle's password (or INTRAPUSH_P12_PASSWORD)")
    device.add_argument("--legacy", action="store_true", help="3DES/SHA-1 encryption for old Android/MDM tools")
    device.add_argument("--force", action="store_true", help="overwrite --out")
    device.set_defaults(func=run(cmd_cert_device))
    revoke = cert.add_parser("revoke", parents=[common], help="revoke by serial, device token or client id")
    revoke.add_argument("target")
    revoke.set_defaults(func=run(cmd_cert_revoke))
    cert.add_parser("list", parents=[common], help="issued certificates and when they expire").set_defaults(
        func=run(cmd_cert_list))
