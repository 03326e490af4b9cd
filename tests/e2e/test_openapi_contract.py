"""/openapi.json is the contract: it names every route the provider listener serves, every status it documents
is one the box answers, and every real answer validates against the schema documented for its status."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest

from appliance.api.openapi import ApiLimits, openapi_document
from appliance.api.provider import ProviderApi
from appliance.api.routes import build_provider_app
from tests.conftest import Box

LIMITS = {"INTRAPUSH_API_MAX_BODY_BYTES": "1024", "INTRAPUSH_API_MAX_BATCH": "3", "INTRAPUSH_API_MAX_TOKENS": "4",
          "INTRAPUSH_PUSH_MAX_TTL_S": "3600", "INTRAPUSH_PUSH_DEFAULT_TTL_S": "60",
          "INTRAPUSH_API_BODY_TIMEOUT_S": "0.5"}
TOO_BIG = json.dumps({"alias": "x" * 2000})  # over api.max_body_bytes=1024


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("contract") / "box", env=LIMITS).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def document(box: Box) -> dict[str, Any]:
    r = httpx.get(f"{box.url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {op["operationId"]: (method, path, op)
            for path, item in document["paths"].items() for method, op in item.items()}


def test_description_names_every_route_of_the_provider_listener() -> None:
    # The route table as the daemon registers it; no handler is called, so the API needs none of its parts.
    api = ProviderApi.__new__(ProviderApi)
    app = build_provider_app(api.routes(), 1 << 20)
    # HEAD is answered for every GET, as HTTP says; the description lists the GET.
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    described = {(method, path) for path, item in openapi_document()["paths"].items() for method in item}
    assert served == described


def test_every_operation_has_an_id_a_security_scheme_and_patterned_path_parameters() -> None:
    doc = openapi_document()
    schemes = set(doc["components"]["securitySchemes"])
    assert schemes == {"apiKey", "enrollmentCredential"}
    for _, _, op in operations(doc).values():
        assert op["operationId"]
        assert all(set(s) <= schemes for s in op["security"])
        for p in op.get("parameters", []):
            assert {"pattern", "maxLength"} & set(p["schema"]), p
    ops = operations(doc)
    assert ops["enrollDevice"][2]["security"] == [{"enrollmentCredential": []}]
    assert ops["sendPush"][2]["security"] == [{"apiKey": []}]
    assert ops["getHealth"][2]["security"] == []
    assert set(ops["enrollDevice"][2]["responses"]["201"]["links"]) >= {"GetDevice", "SendPush"}
    assert set(ops["sendPush"][2]["responses"]["202"]["links"]) == {"GetStatus", "Cancel"}


def test_served_description_states_the_box_limits_and_rules(document: dict[str, Any]) -> None:
    s = document["components"]["schemas"]
    assert s["PushBatch"]["properties"]["messages"]["maxItems"] == 3
    assert s["Target"]["properties"]["tokens"]["maxItems"] == 4
    assert s["Subscribers"]["properties"]["tokens"]["maxItems"] == 4
    assert s["PushMessage"]["properties"]["ttl_s"]["anyOf"][0]["maximum"] == 3600
    assert "1024 bytes" in document["info"]["description"]
    assert s["Target"]["minProperties"] == s["Target"]["maxProperties"] == 1
    assert s["FallbackPolicy"]["properties"]["channels"]["uniqueItems"] is True
    assert {tuple(b["required"]) for b in s["PushMessage"]["anyOf"]} == {("title",), ("body",), ("data",)}
    assert document == openapi_document(ApiLimits(1024, 3, 4, 3600, 4096))


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    return jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]})


class Recorder:
    """Sends requests as the description's operations and checks each answer against it."""

    def __init__(self, box: Box, document: dict[str, Any]) -> None:
        self.box = box
        self.document = document
        self.ops = operations(document)
        self.seen: set[tuple[str, int]] = set()

    def call(self, op_id: str, expect: int, credential: str | None, params: dict[str, str] | None = None,
             body: Any = None, raw: str | None = None, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> Any:
        method, path, _ = self.ops[op_id]
        url = self.box.url + path.format(**(params or {}))
        sent = {"Authorization": f"Bearer {credential}"} if credential else {}
        content = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if content is not None:
            sent["Content-Type"] = content_type
        r = httpx.request(method.upper(), url, content=content, headers={**sent, **(headers or {})}, timeout=10)
        return self.check(op_id, expect, r.status_code, r.headers, r.text)

    def slow_body(self, op_id: str, credential: str, params: dict[str, str]) -> Any:
        """A body that stops arriving: the edge answers once api.body_timeout_s is over."""
        method, path, _ = self.ops[op_id]
        host, port = self.box.addresses["http"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"{method.upper()} {path.format(**params)} HTTP/1.1\r\nHost: {host}\r\n"
                         f"Authorization: Bearer {credential}\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{".encode())
            r = http.client.HTTPResponse(sock)
            r.begin()
            text = r.read().decode()
        return self.check(op_id, 408, r.status, {k.lower(): v for k, v in r.getheaders()}, text)

    def check(self, op_id: str, expect: int, status: int, headers: Any, text: str) -> Any:
        _, _, op = self.ops[op_id]
        assert status == expect, (op_id, text)
        documented = op["responses"].get(str(status))
        assert documented is not None, f"{op_id} answered {status}, which it does not document"
        ((ctype, media),) = documented["content"].items()
        assert headers["content-type"].split(";")[0] == ctype
        for name, header in documented.get("headers", {}).items():
            assert not header["required"] or name.lower() in {k.lower() for k in headers}, (op_id, name)
        if ctype == "application/json":
            errors = [e.message for e in _validator(self.document, media["schema"]).iter_errors(json.loads(text))]
            assert not errors, (op_id, status, errors, text)
        self.seen.add((op_id, status))
        return json.loads(text) if ctype == "application/json" else text


def test_every_documented_status_is_answered_and_every_answer_matches_its_schema(box: Box,
                                                                                  document: dict[str, Any]) -> None:
    app = box.create_app("contract")
    key, secret = app["api_key"], app["enrollment_secret"]
    rec = Recorder(box, document)
    enroll = {"app_id": app["app_id"], "platform": "android", "package": "com.example.app", "device_id": "one"}

    # Every operation that takes a credential refuses a request without one; every body is bounded and JSON.
    for op_id, (_, path, op) in rec.ops.items():
        params = {"token": "dt_x", "id": "m" + "0" * 28, "alias": "emp-1", "topic": "news"}
        if op["security"]:
            rec.call(op_id, 401, None, params, body={})
        if "requestBody" in op and "{token}" not in path:
            credential = secret if op_id == "enrollDevice" else key
            rec.call(op_id, 413, credential, params, raw=TOO_BIG)
            rec.call(op_id, 415, credential, params, raw="{}", content_type="text/html")

    ticket = rec.call("mintTicket", 201, key, body={"alias": "emp-1", "contact": {"email": "a@corp.example"},
                                                    "ttl_s": 900.0})
    rec.call("mintTicket", 400, key, body={"ttl_s": 0})
    device = rec.call("enrollDevice", 201, ticket["ticket"], body=enroll)
    assert device["alias"] == "emp-1"
    other = rec.call("enrollDevice", 201, secret, body={**enroll, "device_id": "two"})
    rec.call("enrollDevice", 400, secret, body={"app_id": app["app_id"]})
    rec.call("enrollDevice", 403, secret, body={**enroll, "alias": "emp-2"})
    token = {"token": device["token"]}
    rec.call("getDevice", 200, key, token)
    rec.call("getDevice", 410, key, {"token": "dt_gone"})
    rec.call("setIdentity", 200, key, token, body={"alias": "emp-1", "contact": {"phone": "+4915112345678"}})
    rec.call("setIdentity", 400, key, token, body={"alias": ""})
    rec.call("setIdentity", 410, key, {"token": "dt_gone"}, body={})
    rec.call("setIdentity", 413, key, token, raw=TOO_BIG)
    rec.call("setIdentity", 415, key, token, raw="{}", content_type="text/html")
    rec.call("setAliasContact", 200, key, {"alias": "emp-1"}, body={"email": "b@corp.example"})
    rec.call("setAliasContact", 400, key, {"alias": "emp-1"}, body={"phone": "123"})
    topic = {"topic": "news"}
    rec.call("subscribe", 200, key, topic, body={"tokens": [device["token"], "dt_gone"]})
    rec.call("subscribe", 400, key, {"topic": "a b"}, body={"tokens": [device["token"]]})
    rec.call("unsubscribe", 200, key, topic, body={"tokens": [other["token"]]})
    rec.call("unsubscribe", 400, key, topic, body={"tokens": ["a"] * 5})

    sent = rec.call("sendPush", 202, key, body={"to": {"topic": "news"}, "title": "t", "ttl_s": 3600.0})
    rec.call("sendPush", 202, key, body={"messages": [{"to": {"alias": "emp-1"}, "body": "b"},
                                                      {"to": {"token": "dt_gone"}, "body": "b"},
                                                      {"to": {"all": True}, "data": {"k": 1}, "ttl_s": 7200}]})
    rec.call("sendPush", 400, key, body={"to": {"all": True}, "title": "t", "ttl_s": 7200})
    rec.call("sendPush", 410, key, body={"to": {"token": "dt_gone"}, "title": "t"})
    mid = {"id": sent["id"]}
    rec.call("getMessageStatus", 200, key, mid)
    rec.call("getMessageStatus", 400, key, {"id": "m1"})
    rec.call("getMessageStatus", 404, key, {"id": "m" + "0" * 28})
    rec.call("cancelMessage", 200, key, mid)
    rec.call("cancelMessage", 400, key, {"id": "m1"})
    rec.call("cancelMessage", 404, key, {"id": "m" + "0" * 28})
    rec.call("getMessageStatus", 200, key, mid)  # cancelled: still readable
    limited = box.create_app("contract-limited")
    box.cli("app", "set-limits", limited["app_id"], "--pushes-per-s", "0.001")
    box.enroll(limited, "one")
    rec.call("sendPush", 202, limited["api_key"], body={"to": {"all": True}, "title": "t"})
    assert rec.call("sendPush", 429, limited["api_key"], body={"to": {"all": True}, "title": "t"})["retry_after_s"] >= 1

    # The HTTP edge: a bad Host or a header line over api.max_header_bytes on any route; a body that stops.
    params = {"token": device["token"], "id": sent["id"], "alias": "emp-1", "topic": "news"}
    for op_id, (_, path, op) in rec.ops.items():
        rec.call(op_id, 400, key, params, headers={"Host": "bad host!"})
        rec.call(op_id, 431, key, params, headers={"X-Padding": "a" * 9000})
        if "requestBody" in op:
            rec.slow_body(op_id, ticket["ticket"] if op_id == "enrollDevice" else key, params)

    rec.call("unregisterDevice", 200, key, {"token": other["token"]})
    rec.call("unregisterDevice", 410, key, {"token": other["token"]})
    for op_id in ("getHealth", "getOpenApi", "getDocs"):
        rec.call(op_id, 200, None)

    documented = {(op_id, int(status)) for op_id, (_, _, op) in rec.ops.items() for status in op["responses"]}
    assert rec.seen == documented


# -- what fuzzing found: the server and the description now mean the same (#16) --------------------------
def test_integral_number_is_an_integer_as_json_schema_says(box: Box) -> None:
    app = box.create_app("integral")
    with box.api(app) as api:
        assert api.post("/v1/enrollment-tickets", json={"ttl_s": 900.0}).status_code == 201
        r = api.post("/v1/enrollment-tickets", json={"ttl_s": 900.5})
        assert (r.status_code, r.json()["code"]) == (400, 40002)
        r = api.post("/v1/enrollment-tickets", json={"ttl_s": "900"})
        assert (r.status_code, r.json()["code"]) == (400, 40002)


def test_explicit_null_beside_a_target_is_refused(box: Box) -> None:
    app = box.create_app("null-target")
    device = box.enroll(app, "d")
    with box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": device["token"], "topic": None}, "title": "t"})
        assert (r.status_code, r.json()["code"]) == (400, 40002)
        r = api.post("/v1/messages", json={"to": {"token": None}, "title": "t"})
        assert (r.status_code, r.json()["code"]) == (400, 40002)


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\ufeff", "\x1c", "\u200b"])
def test_email_whitespace_means_the_same_to_box_and_description(box: Box, document: dict[str, Any],
                                                                  char: str) -> None:
    app = box.create_app("email-" + hex(ord(char)))
    email = f"a{char}b@corp.example"
    described = _validator(document, {"$ref": "#/components/schemas/Contact"}).is_valid({"email": email})
    with box.api(app) as api:
        r = api.put("/v1/aliases/emp-1/contact", json={"email": email})
    assert r.status_code == (200 if described else 400), r.text



def test_tokens_over_api_max_tokens_are_refused_even_when_they_repeat(box: Box) -> None:
    # The description says maxItems: api.max_tokens (4 here) for `to.tokens`; the box counted after removing
    # repeats, so five copies of one token got through.
    app = box.create_app("repeat-tokens")
    device = box.enroll(app, "d")
    with box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"tokens": [device["token"]] * 5}, "title": "t"})
        assert (r.status_code, r.json()["code"]) == (400, 40007)
        assert api.post("/v1/messages", json={"to": {"tokens": [device["token"]] * 4}, "title": "t"}).status_code == 202


def test_integers_in_data_are_described_as_the_edge_takes_them(box: Box, document: dict[str, Any]) -> None:
    # The edge refuses an integer literal outside 64 bits. JSON Schema cannot tell 1e300 (a float literal, which
    # the edge takes) from an integer of that size, so the description refuses both: stricter, never looser.
    app = box.create_app("int64")
    box.enroll(app, "d")
    push = _validator(document, {"$ref": "#/components/schemas/PushMessage"})
    with box.api(app) as api:
        for value in (2**63 - 1, -(2**63), 1.5, -2.5e-3, 2**63, -(2**63) - 1, 10**30):
            doc = {"to": {"all": True}, "data": {"n": [{"v": value}]}}
            r = api.post("/v1/messages", content=json.dumps(doc), headers={"Content-Type": "application/json"})
            assert r.status_code == (202 if push.is_valid(doc) else 400), (value, r.text)
