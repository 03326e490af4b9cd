"""The OpenAPI 3.1 document of the provider API, built from the request schemas (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from appliance.api.schemas import EnrollRequest, IdentityRequest, PushBatch, PushMessage, Subscribers, TicketRequest
from appliance.errors import CATALOG

_ERROR = {"$ref": "#/components/schemas/Error"}


def _body(ref: str | dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"} if isinstance(ref, str) else ref
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answers(ok: int, description: str, codes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): {"description": description}}
    for http in sorted({CATALOG[c].http for c in codes}):
        names = ", ".join(f"{c} {CATALOG[c].name}" for c in codes if CATALOG[c].http == http)
        out[str(http)] = {"description": names, "content": {"application/json": {"schema": _ERROR}}}
    return out


def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (EnrollRequest, TicketRequest, IdentityRequest, PushMessage, PushBatch,
                                     Subscribers)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs.get("$defs", {})
    schemas["Error"] = {
        "type": "object",
        "required": ["code", "http", "error", "link"],
        "properties": {"code": {"type": "integer"}, "http": {"type": "integer"}, "error": {"type": "string"},
                       "link": {"type": "string"}},
    }
    auth = [{"apiKey": []}]
    enroller = [{"enrollmentCredential": []}]
    token = {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
    common = [40001, 40002, 40010, 40101, 40102, 41301]
    mid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    topic = {"name": "topic", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "intrapush provider API", "version": "1",
                 "description": "Send pushes to enrolled devices; see docs/provider-api.md."},
        "components": {"schemas": schemas,
                       "securitySchemes": {
                           "apiKey": {"type": "http", "scheme": "bearer",
                                      "description": "the app's API key (ak_…), held only by the app server"},
                           "enrollmentCredential": {"type": "http", "scheme": "bearer",
                                                    "description": "a one-time enrollment ticket (et_…) or the "
                                                                   "app's enrollment secret (es_…)"}}},
        "paths": {
            "/v1/devices": {"post": {
                "summary": "Enroll a device (Bearer: a ticket, or the app's enrollment secret)", "security": enroller,
                "requestBody": _body("EnrollRequest"),
                "responses": _answers(201, "token, MQTT credentials, topics, keepalive, alias, replaced",
                                      common + [40103, 40104, 40105, 40106, 40301, 40302])}},
            "/v1/enrollment-tickets": {"post": {
                "summary": "Mint a one-time enrollment ticket bound to a user (alias) and contact", "security": auth,
                "requestBody": _body("TicketRequest"),
                "responses": _answers(201, "ticket, expires_at, alias", common)}},
            "/v1/devices/{token}": {
                "get": {"summary": "A device's user, contact and presence", "security": auth,
                        "parameters": [token], "responses": _answers(200, "device", [40101, 40102, 41001])},
                "delete": {"summary": "Unregister one of the app's devices", "security": auth,
                           "parameters": [token], "responses": _answers(200, "token, unregistered_at",
                                                                        [40101, 40102, 41001])}},
            "/v1/devices/{token}/identity": {"put": {
                "summary": "Bind a device to a user and contact, or clear them", "security": auth,
                "parameters": [token], "requestBody": _body("IdentityRequest"),
                "responses": _answers(200, "token, alias, contact", common + [41001])}},
            "/v1/messages": {"post": {
                "summary": "Send one push, or up to api.max_batch in {\"messages\": [...]}", "security": auth,
                "requestBody": _body({"oneOf": [{"$ref": "#/components/schemas/PushMessage"},
                                                {"$ref": "#/components/schemas/PushBatch"}]}),
                "responses": _answers(202, "committed to disk: id, targeted, unregistered",
                                      common + [40003, 40004, 40005, 40006, 40007, 41001])}},
            "/v1/messages/{id}": {
                "get": {"summary": "Counts per state, and per token for small audiences", "security": auth,
                        "parameters": [mid], "responses": _answers(200, "status", [40009, 40101, 40102, 40402])},
                "delete": {"summary": "Cancel what is still pending", "security": auth, "parameters": [mid],
                           "responses": _answers(200, "cancelled count", [40009, 40101, 40102, 40402])}},
            "/v1/topics/{topic}/subscribers": {
                "post": {"summary": "Subscribe tokens to a topic", "security": auth, "parameters": [topic],
                         "requestBody": _body("Subscribers"),
                         "responses": _answers(200, "subscribed count", common + [40007, 40008])},
                "delete": {"summary": "Unsubscribe tokens from a topic", "security": auth, "parameters": [topic],
                           "requestBody": _body("Subscribers"),
                           "responses": _answers(200, "unsubscribed count", common + [40007, 40008])}},
        },
    }
