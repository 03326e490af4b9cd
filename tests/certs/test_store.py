"""The store's files: private keys 0600 from birth, atomic replacement, a readable index, one writer at a time."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import CertStore, DamagedStore, create_ca, issue_device_cert, issue_server_cert, list_certs
from certs.store import write_atomically


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_0600_even_with_a_permissive_umask(open_umask: None, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    create_ca(store)
    issue_server_cert(store, ["push.example.com"])

    assert mode(store.ca_key) == 0o600 and mode(store.server_key) == 0o600
    assert mode(store.ca_pem) == 0o644 and mode(store.server_pem) == 0o644 and mode(store.crl_pem) == 0o644
    assert mode(store.directory) == 0o700


def test_atomic_write_leaves_no_temporary_files_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "server.pem"
    write_atomically(target, b"old", private=False)

    with pytest.raises(TypeError):  # a write that fails after the temporary file exists
        write_atomically(target, None, private=False)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["server.pem"]


def test_index_records_what_was_issued(store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")
    doc = json.loads(store.index_json.read_text())

    assert doc["version"] == 1
    entry = doc["certs"][-1]
    assert entry["serial"] == format(device.cert.serial_number, "x")
    assert entry["kind"] == "device" and entry["name"] == "phone-1" and entry["revoked_at"] is None
    assert entry["not_after"] == device.cert.not_valid_after_utc.isoformat()
    assert doc["certs"][0]["kind"] == "server" and doc["certs"][0]["sans"] == ["localhost", "127.0.0.1", "::1"]


def test_damaged_index_is_reported_not_overwritten(store: CertStore) -> None:
    store.index_json.write_text("{not json")
    with pytest.raises(DamagedStore, match="index.json"):
        issue_device_cert(store, "phone-1")
    assert store.index_json.read_text() == "{not json"


def test_damaged_ca_certificate_is_reported(store: CertStore) -> None:
    store.ca_pem.write_text("garbage")
    with pytest.raises(DamagedStore, match="ca.pem"):
        store.load_ca()


def test_missing_ca_key_is_reported(store: CertStore) -> None:
    store.ca_key.unlink()
    with pytest.raises(DamagedStore, match="key"):
        issue_device_cert(store, "phone-1")


def test_concurrent_issuers_lose_no_index_entries(store: CertStore) -> None:
    # The daemon and a CLI command are separate processes; threads with separate stores stand in for them.
    errors: list[BaseException] = []

    def issue(n: int) -> None:
        try:
            issue_device_cert(CertStore(store.directory), f"phone-{n}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=issue, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    assert sorted(c.name for c in list_certs(store) if c.kind == "device") == sorted(f"phone-{n}" for n in range(12))


def test_repr_never_shows_the_passphrase(tmp_path: Path) -> None:
    assert "hunter2" not in repr(CertStore(tmp_path, passphrase="hunter2"))
