"""The OpenAPI 3.1 document of the provider listener (served at /openapi.json): every route, built from the
request models that validate bodies and the answer models that describe replies, with the box's limits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from appliance.api import schemas as S
from appliance.errors import CATALOG

REF = "#/components/schemas/{model}"
INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}
# Any JSON the edge takes (appliance/api/edge.py): an integer outside the signed 64-bit range is refused (#16).
JSON_VALUE = {"anyOf": [
    {"type": ["string", "boolean", "null"]},
    {"type": "number", "not": {"type": "integer"}},
    {"type": "integer", **INT64},
    {"type": "array", "items": {"$ref": REF.format(model="JsonValue")}},
    {"type": "object", "additionalProperties": {"$ref": REF.format(model="JsonValue")}}],
    "description": "any JSON value; integers within the signed 64-bit range, nesting at most 32 levels deep (a "
                   "float literal such as 1e300 is taken at any size, but JSON Schema counts it as an integer)"}
API_KEY, ENROLLMENT = "apiKey", "enrollmentCredential"

# Where a request can be refused before its handler's own checks: the HTTP edge (every request: its Host and
# header lines; every body: its framing and its arrival, docs/provider-api.md#limits), the credential, the body.
EDGE = [40013, 43101]
AUTH = [40101, 40102]
BODY = [40001, 40002, 40010, 40014, 40801, 41301]


@dataclass(frozen=True)
class ApiLimits:
    """The settings the description states as limits; the defaults are the shipped ones (docs/config.md)."""

    max_body_bytes: int = 2097152
    max_batch: int = 500
    max_tokens: int = 10000
    max_ttl_s: int = 2419200
    max_payload_bytes: int = 4096


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    ok: int
    answer: type[BaseModel] | None  # None: not JSON (see `content`)
    codes: list[int] = field(default_factory=list)
    security: str | None = API_KEY
    request: str | None = None
    links: dict[str, Any] = field(default_factory=dict)
    content: str = "application/json"


def _link(operation_id: str, description: str, parameters: dict[str, Any] | None = None,
          body: Any = None) -> dict[str, Any]:
    link: dict[str, Any] = {"operationId": operation_id, "description": description}
    if parameters:
        link["parameters"] = parameters
    if body is not None:
        link["requestBody"] = body
    return link


TOKEN = "$response.body#/token"
MESSAGE_ID = "$response.body#/id"
DEVICE_LINKS = {
    "GetDevice": _link("getDevice", "the device just enrolled", {"path.token": TOKEN}),
    "SetIdentity": _link("setIdentity", "bind it to a user", {"path.token": TOKEN}),
    "SendPush": _link("sendPush", "push to it", body={"to": {"token": TOKEN}, "title": "hello"}),
    "Subscribe": _link("subscribe", "subscribe it to a topic", body={"tokens": [TOKEN]}),
    "Unregister": _link("unregisterDevice", "unregister it", {"path.token": TOKEN}),
}
MESSAGE_LINKS = {
    "GetStatus": _link("getMessageStatus", "follow the push", {"path.id": MESSAGE_ID}),
    "Cancel": _link("cancelMessage", "cancel what is still pending", {"path.id": MESSAGE_ID}),
}

OPERATIONS = [
    Operation("post", "/v1/enrollment-tickets", "mintTicket",
              "Mint a one-time enrollment ticket bound to a user (alias) and contact; the device enrolls with it "
              "as its Bearer credential", 201, S.Ticket, AUTH + BODY, request="TicketRequest"),
    Operation("post", "/v1/devices", "enrollDevice",
              "Enroll a device (Bearer: a ticket, or the app's enrollment secret); the credential is checked "
              "before the body is read", 201, S.Enrolled,
              [40101, 40102, 40103, 40104, 40105, 40106, 40301, 40302] + BODY, security=ENROLLMENT,
              request="EnrollRequest", links=DEVICE_LINKS),
    Operation("get", "/v1/devices/{token}", "getDevice", "A device's user, contact and presence", 200,
              S.DeviceInfo, AUTH + [41001]),
    Operation("delete", "/v1/devices/{token}", "unregisterDevice",
              "Unregister one of the app's devices: sends to it answer 410 from now on", 200, S.Unregistered,
              AUTH + [41001]),
    Operation("put", "/v1/devices/{token}/identity", "setIdentity",
              "Bind a device to a user and contact, or clear them (null)", 200, S.Identity,
              AUTH + [41001] + BODY, request="IdentityRequest"),
    Operation("post", "/v1/messages", "sendPush",
              "Send one push, or up to api.max_batch in {\"messages\": [...]}; answered once committed to disk",
              202, None, AUTH + BODY + [40003, 40004, 40005, 40006, 40007, 40011, 41001, 42902], links=MESSAGE_LINKS),
    Operation("get", "/v1/messages/{id}", "getMessageStatus",
              "Counts per state, and per token for audiences up to push.status_detail_limit", 200, S.MessageStatus,
              AUTH + [40009, 40402]),
    Operation("delete", "/v1/messages/{id}", "cancelMessage", "Cancel every still-pending delivery", 200,
              S.Cancelled, AUTH + [40009, 40402]),
    Operation("put", "/v1/aliases/{alias}/contact", "setAliasContact",
              "The fallback contact of every device bound to the alias (both null: remove it)", 200,
              S.AliasContact, AUTH + BODY, request="Contact"),
    Operation("post", "/v1/topics/{topic}/subscribers", "subscribe", "Subscribe tokens to a topic", 200,
              S.Subscribed, AUTH + BODY + [40007, 40008], request="Subscribers"),
    Operation("delete", "/v1/topics/{topic}/subscribers", "unsubscribe", "Unsubscribe tokens from a topic", 200,
              S.Unsubscribed, AUTH + BODY + [40007, 40008], request="Subscribers"),
    Operation("get", "/healthz", "getHealth", "Liveness", 200, S.Health, security=None),
    Operation("get", "/openapi.json", "getOpenApi", "This description", 200, None, security=None),
    Operation("get", "/docs", "getDocs", "A readable page of this description", 200, None, security=None,
              content="text/html"),
]

PATH_PARAMETERS = {
    "token": {"type": "string", "pattern": r"^dt_[A-Za-z0-9_\-]{1,125}$",
              "description": "a device token; any other is answered 410 with reason unknown"},
    "id": {"type": "string", "pattern": r"^m[0-9a-f]{28}$", "description": "a message id this box issued"},
    "alias": {"type": "string", "minLength": 1, "maxLength": 128},
    "topic": {"type": "string", "pattern": S.TOPIC_PATTERN},
}

REQUEST_MODELS = (S.EnrollRequest, S.TicketRequest, S.IdentityRequest, S.Contact, S.PushMessage, S.PushBatch,
                  S.Subscribers)
ANSWER_MODELS = (S.Error, S.Ticket, S.Enrolled, S.DeviceInfo, S.Unregistered, S.Identity, S.PushAccepted,
                 S.BatchAccepted, S.MessageStatus, S.Cancelled, S.AliasContact, S.Subscribed, S.Unsubscribed,
                 S.Health)


def _component_schemas(limits: ApiLimits) -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in REQUEST_MODELS]
                                + [(m, "serialization") for m in ANSWER_MODELS], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    for schema in schemas.values():
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
    # A message of a batch that breaks a limit checked per message is refused alone (its result carries the
    # error, the batch is still 202): its schema has no such limit. A lone message breaking it is a 400.
    schemas["BatchedMessage"] = copy.deepcopy(schemas["PushMessage"])
    schemas["BatchedMessage"]["properties"]["to"] = {"$ref": REF.format(model="BatchedTarget")}
    schemas["BatchedMessage"]["description"] = (
        "ttl_s over push.max_ttl_s, more than api.max_tokens tokens, a push over push.max_payload_bytes, an "
        "unavailable fallback channel or targets that reach nobody refuse this message only")
    schemas["BatchedTarget"] = copy.deepcopy(schemas["Target"])
    schemas["BatchedMessage"]["properties"]["ttl_s"]["anyOf"][0].update(maximum=INT64["maximum"])
    schemas["JsonValue"] = JSON_VALUE
    for name in ("PushMessage", "BatchedMessage"):
        data = schemas[name]["properties"]["data"]["anyOf"][0]
        data["additionalProperties"] = {"$ref": REF.format(model="JsonValue")}
    schemas["PushBatch"]["properties"]["messages"]["items"] = {"$ref": REF.format(model="BatchedMessage")}
    schemas["PushBatch"]["properties"]["messages"]["maxItems"] = limits.max_batch
    schemas["PushMessage"]["properties"]["ttl_s"]["anyOf"][0]["maximum"] = limits.max_ttl_s
    schemas["PushMessage"]["description"] = (f"The push as the device receives it is at most "
                                             f"{limits.max_payload_bytes} bytes (push.max_payload_bytes)")
    schemas["Target"]["properties"]["tokens"]["maxItems"] = limits.max_tokens
    schemas["Subscribers"]["properties"]["tokens"]["maxItems"] = limits.max_tokens
    return schemas


def _error_answer(codes: list[int], http: int) -> dict[str, Any]:
    mine = [c for c in codes if CATALOG[c].http == http]
    answer: dict[str, Any] = {
        "description": ", ".join(f"{c} {CATALOG[c].name}" for c in mine),
        "content": {"application/json": {"schema": {"allOf": [
            {"$ref": REF.format(model="Error")},
            {"properties": {"code": {"enum": mine}, "http": {"const": http}}}]}}},
    }
    if http == 429:
        answer["headers"] = {"Retry-After": {"required": True, "description": "seconds until the app may send again",
                                             "schema": {"type": "integer", "minimum": 1}}}
    return answer


def _answers(op: Operation) -> dict[str, Any]:
    if op.answer is not None:
        schema: dict[str, Any] = {"$ref": REF.format(model=op.answer.__name__)}
    elif op.operation_id == "sendPush":
        schema = {"oneOf": [{"$ref": REF.format(model="PushAccepted")}, {"$ref": REF.format(model="BatchAccepted")}]}
    else:
        schema = {"type": "object"} if op.content == "application/json" else {"type": "string"}
    ok: dict[str, Any] = {"description": (op.answer.__doc__ or op.summary).strip().splitlines()[0]
                          if op.answer else op.summary,
                          "content": {op.content: {"schema": schema}}}
    if op.links:
        ok["links"] = op.links
    out = {str(op.ok): ok}
    codes = EDGE + op.codes
    for http in sorted({CATALOG[c].http for c in codes}):
        out[str(http)] = _error_answer(codes, http)
    return out


def _operation(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                           "security": [{op.security: []}] if op.security else []}
    names = [part[1:-1] for part in op.path.split("/") if part.startswith("{")]
    if names:
        doc["parameters"] = [{"name": n, "in": "path", "required": True, "schema": PATH_PARAMETERS[n]}
                             for n in names]
    body = op.request
    if op.operation_id == "sendPush":
        schema: dict[str, Any] = {"oneOf": [{"$ref": REF.format(model="PushMessage")},
                                            {"$ref": REF.format(model="PushBatch")}]}
    elif body is not None:
        schema = {"$ref": REF.format(model=body)}
    if body is not None or op.operation_id == "sendPush":
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    doc["responses"] = _answers(op)
    return doc


def openapi_document(limits: ApiLimits | None = None) -> dict[str, Any]:
    limits = limits or ApiLimits()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "intrapush provider API", "version": "1",
                 "description": "Send pushes to enrolled devices; see docs/provider-api.md. Request bodies are at "
                                f"most {limits.max_body_bytes} bytes (api.max_body_bytes; 413 code 41301). "
                                "Before any request, a connection may be refused with 429 (42901, too many from one "
                                "address) or 503 (50301, too many in all), then closed; a request that is not "
                                "well-formed HTTP/1.1 gets 400 (40012)."},
        "components": {
            "schemas": _component_schemas(limits),
            "securitySchemes": {
                API_KEY: {"type": "http", "scheme": "bearer",
                          "description": "the app's API key (ak_…), held only by the app server"},
                ENROLLMENT: {"type": "http", "scheme": "bearer",
                             "description": "a one-time enrollment ticket (et_…) minted by mintTicket, or the "
                                            "app's enrollment secret (es_…)"}}},
        "paths": paths,
    }
