"""The provider API: enrollment, pushes, push status and cancel, topic subscribers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from appliance import errors as E
from appliance.accounts import Accounts, Enrollment
from appliance.api import edge
from appliance.api.limits import Limits, SendLimits
from appliance.api.schemas import (Contact, EnrollRequest, IdentityRequest, PushBatch, PushMessage, Subscribers, Target,
                                   TicketRequest)
from appliance.broker import topics
from appliance.directory import App, Device, Directory, hash_secret, secret_matches
from appliance.dispatch import Accepted, Dispatcher, is_message_id
from appliance.errors import ApiError
from appliance.store import Store
from appliance.store import devices as sql_devices
from appliance.store import messages as sql_messages
from appliance.store import tickets as sql_tickets

TICKET_PREFIX = "et_"


@dataclass
class ProviderSettings:
    max_batch: int
    max_tokens: int
    default_ttl_s: int
    max_ttl_s: int
    max_payload_bytes: int
    status_detail_limit: int
    public_host: str
    mqtt_port: int
    keepalive: dict[str, int]
    mqtt_tls: bool = False
    websocket_url: str | None = None  # with {host}
    tls_info: dict[str, str] | None = None
    fallback_channels: frozenset[str] = frozenset()


def bearer(request: web.Request) -> str:
    """The bearer key; checks no body, so a handler calls it before read_json (#10)."""
    return edge.bearer_credential(request.headers.get("Authorization"))


async def read_json(request: web.Request) -> Any:
    """The body as strict JSON within the edge's limits (appliance/api/edge.py, #16)."""
    return await edge.read_json_body(request)


def validate(model: type[BaseModel], doc: Any) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = [{"at": ".".join(str(p) for p in err["loc"]) or "(body)", "problem": err["msg"]}
                    for err in exc.errors(include_url=False, include_input=False)]
        first = problems[0]
        raise ApiError(E.INVALID_REQUEST, f"{first['at']}: {first['problem']}", problems=problems) from None


class ProviderApi:
    def __init__(self, settings: ProviderSettings, directory: Directory, dispatcher: Dispatcher, store: Store,
                 accounts: Accounts, limits: Limits | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.dispatcher = dispatcher
        self.store = store
        self.accounts = accounts
        self.limits = SendLimits(limits or Limits(0, 0))
        for app in directory.apps.values():
            self.limits.set_app(app.id, app.pushes_per_s, app.targets_per_min)
        accounts.on_limits = lambda app: self.limits.set_app(app.id, app.pushes_per_s, app.targets_per_min)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/devices", self.handle_enroll),
            web.post("/v1/enrollment-tickets", self.handle_mint_ticket),
            web.get("/v1/devices/{token}", self.handle_device),
            web.delete("/v1/devices/{token}", self.handle_unregister),
            web.put("/v1/devices/{token}/identity", self.handle_identity),
            web.post("/v1/messages", self.handle_send),
            web.get("/v1/messages/{id}", self.handle_status),
            web.delete("/v1/messages/{id}", self.handle_cancel),
            web.put("/v1/aliases/{alias}/contact", self.handle_alias_contact),
            web.post("/v1/topics/{topic}/subscribers", self.handle_subscribe),
            web.delete("/v1/topics/{topic}/subscribers", self.handle_unsubscribe),
        ]

    def _app(self, request: web.Request) -> App:
        app = self.directory.app_for_key(bearer(request))
        if app is None:
            raise ApiError(E.WRONG_CREDENTIALS, "the API key is not valid (rotated or never issued)")
        return app

    # -- enrollment ------------------------------------------------------------------------------
    async def _enroller(self, request: web.Request) -> tuple[App, str | None]:
        """Who vouches for the device, checked before the body is read: a ticket its app server minted, or
        the app's enrollment secret (current, or the previous one within its grace period)."""
        credential = bearer(request)
        if credential.startswith(TICKET_PREFIX):
            row = await self.store.read(sql_tickets.find_ticket, hash_secret(credential))
            app = self.directory.apps.get(row["app_id"]) if row is not None else None
            if app is None:
                raise ApiError(E.TICKET_UNKNOWN)
            return app, credential
        app = self.directory.app_for_secret(credential)
        if app is None:
            raise ApiError(E.WRONG_CREDENTIALS, "the enrollment secret is not valid (rotated or never issued)")
        if app.require_ticket:
            raise ApiError(E.TICKET_REQUIRED, f"app {app.id} enrolls devices only with a ticket from its app server")
        return app, None

    async def handle_enroll(self, request: web.Request) -> web.Response:
        app, ticket = await self._enroller(request)
        req: EnrollRequest = validate(EnrollRequest, await read_json(request))
        if req.app_id != app.id:
            raise ApiError(E.WRONG_CREDENTIALS, "the credential is not valid for this app_id")
        if req.alias is not None or req.contact is not None:
            raise ApiError(E.IDENTITY_NEEDS_TICKET)
        previous = None
        if req.previous is not None:
            previous = self.directory.by_token.get(req.previous.token)
            if (previous is None or previous.app_id != app.id
                    or not secret_matches(req.previous.password, previous.password_hash)):
                raise ApiError(E.WRONG_PREVIOUS)
        device, password, replaced = await self.accounts.enroll(
            Enrollment(app, req.platform, req.package, req.device_id, ticket, previous))
        host = self.settings.public_host or edge.device_host(request)
        cid = device.client_id
        answer: dict[str, Any] = {
            "token": device.token,
            "mqtt": {"host": host, "port": self.settings.mqtt_port, "tls": self.settings.mqtt_tls,
                     "client_id": cid, "username": cid, "password": password},
            "inbox_topic": topics.inbox_topic(cid),
            "hello_topic": topics.hello_topic(cid),
            "ack_topic": topics.ack_topic(cid),
            "status_topic": topics.status_topic(cid),
            "keepalive_s": self.settings.keepalive[device.platform],
            "alias": device.alias,
            "replaced": replaced,
        }
        if self.settings.websocket_url:
            # An IPv6 address goes in brackets in a URL (RFC 3986); `mqtt.host` stays bare, as sockets take it.
            answer["websocket_url"] = self.settings.websocket_url.format(host=f"[{host}]" if ":" in host else host)
        if self.settings.tls_info:
            answer.update(self.settings.tls_info)
        return web.json_response(answer, status=201)

    async def handle_mint_ticket(self, request: web.Request) -> web.Response:
        """The app server vouches for a user: the device that redeems this ticket is bound to its alias and
        contact."""
        app = self._app(request)
        req: TicketRequest = validate(TicketRequest, await read_json(request))
        contact = req.contact or Contact()
        doc = await self.accounts.mint_ticket(app, req.alias, contact.phone, contact.email, req.ttl_s)
        return web.json_response(doc, status=201)

    async def handle_device(self, request: web.Request) -> web.Response:
        app = self._app(request)
        device = await self._own_device(app, request.match_info["token"])
        online = self.dispatcher.online.get(device.id)
        return web.json_response({
            "token": device.token, "platform": device.platform, "alias": device.alias,
            "contact": {"phone": device.phone, "email": device.email},
            "online": online is not None, "subscribed": online is not None and online.link.subscribed,
            "last_seq": device.last_seq,
            "topics": sorted(device.topics),
        })

    async def handle_identity(self, request: web.Request) -> web.Response:
        """Bind one of the app's devices to a user and contact, or clear them (null)."""
        app = self._app(request)
        device = await self._own_device(app, request.match_info["token"])
        req: IdentityRequest = validate(IdentityRequest, await read_json(request))
        contact = req.contact or Contact()
        await self.accounts.set_identity(app, device, req.alias, contact.phone, contact.email)
        return web.json_response({"token": device.token, "alias": device.alias,
                                  "contact": {"phone": device.phone, "email": device.email}})

    async def handle_unregister(self, request: web.Request) -> web.Response:
        app = self._app(request)
        device = await self._own_device(app, request.match_info["token"])
        return web.json_response(await self.accounts.unregister(app, device.token))

    async def _own_device(self, app: App, token: str) -> Device:
        device = self.directory.by_token.get(token)
        if device is not None and device.app_id == app.id:
            return device
        gone = await self._unregistered(app, [token])
        raise ApiError(E.UNREGISTERED, **gone[0])

    # -- pushes ----------------------------------------------------------------------------------
    async def handle_send(self, request: web.Request) -> web.Response:
        app = self._app(request)
        self.limits.check(app.id)  # before the body is read
        doc = await read_json(request)
        single = not (isinstance(doc, dict) and "messages" in doc)
        if not single and isinstance(doc.get("messages"), list) and len(doc["messages"]) > self.settings.max_batch:
            raise ApiError(E.BATCH_TOO_LARGE, f"{len(doc['messages'])} messages; at most {self.settings.max_batch}")
        items: list[PushMessage] = [validate(PushMessage, doc)] if single else validate(PushBatch, doc).messages
        results: list[dict[str, Any]] = []
        accepted: list[Accepted] = []
        for index, item in enumerate(items):
            try:
                acc, unregistered = await self._prepare(app, item)
            except ApiError as exc:
                if single:
                    raise
                results.append({"index": index, "error": exc.body()})
                continue
            accepted.append(acc)
            results.append({"id": acc.message["id"], "targeted": len(acc.targets), "unregistered": unregistered})
        if accepted:
            self.limits.charge(app.id, len(accepted), sum(len(a.targets) for a in accepted))
            await self.dispatcher.submit(accepted)
        if single:
            return web.json_response(results[0], status=202)
        return web.json_response({"accepted": len(accepted), "refused": len(items) - len(accepted),
                                  "results": results}, status=202)

    async def _prepare(self, app: App, item: PushMessage) -> tuple[Accepted, list[dict[str, Any]]]:
        s = self.settings
        ttl = s.default_ttl_s if item.ttl_s is None else item.ttl_s
        if ttl > s.max_ttl_s:
            raise ApiError(E.TTL_TOO_LONG, f"ttl_s {ttl} is over push.max_ttl_s={s.max_ttl_s}")
        targets, unregistered, target_doc = await self._resolve(app, item.to)
        if not targets:
            if item.to.token is not None:
                raise ApiError(E.UNREGISTERED, **unregistered[0])
            raise ApiError(E.NO_TARGET, f"the push targets nobody ({json.dumps(target_doc)})",
                           unregistered=unregistered)
        policy = item.fallback.model_dump() if item.fallback is not None else app.fallback
        if item.fallback is not None:
            missing = [c for c in item.fallback.channels if c not in s.fallback_channels]
            if missing:
                raise ApiError(E.FALLBACK_UNAVAILABLE,
                               f"fallback channel {', '.join(missing)} is not configured on this box "
                               f"(configured: {', '.join(sorted(s.fallback_channels)) or 'none'})")
        acc = self.dispatcher.prepare(app.id, item.model_dump(exclude={"to", "fallback"}), targets, ttl, target_doc,
                                      policy)
        size = len(acc.body) + 1
        if size > s.max_payload_bytes:
            raise ApiError(E.PAYLOAD_TOO_LARGE, f"the push is {size} bytes; at most {s.max_payload_bytes}")
        return acc, unregistered

    async def _resolve(self, app: App, to: Target) -> tuple[list[Device], list[dict[str, Any]], dict[str, Any]]:
        d = self.directory
        if to.all:
            return list(d.app_devices.get(app.id, {}).values()), [], {"all": True}
        if to.topic is not None:
            return list(d.topics.get((app.id, to.topic), {}).values()), [], {"topic": to.topic}
        if to.alias is not None:
            return list(d.aliases.get((app.id, to.alias), {}).values()), [], {"alias": to.alias}
        # Counted as sent, repeats included: the description's maxItems (#16).
        if to.tokens is not None and len(to.tokens) > self.settings.max_tokens:
            raise ApiError(E.TOO_MANY_TOKENS, f"{len(to.tokens)} tokens; at most {self.settings.max_tokens}")
        tokens = [to.token] if to.token is not None else list(dict.fromkeys(to.tokens or []))
        found, missing = [], []
        for token in tokens:
            device = d.by_token.get(token) if isinstance(token, str) else None
            if device is not None and device.app_id == app.id:
                found.append(device)
            else:
                missing.append(token)
        unregistered = await self._unregistered(app, missing) if missing else []
        doc = {"token": to.token} if to.token is not None else {"tokens": len(tokens)}
        return found, unregistered, doc

    async def _unregistered(self, app: App, tokens: list[str]) -> list[dict[str, Any]]:
        """Why each token cannot be sent to, with when it stopped being valid (APNs' 410 semantics)."""
        def lookup(conn: Any) -> list[dict[str, Any]]:
            out = []
            for token in tokens:
                row = sql_devices.find_token(conn, token)
                if row is None or row["app_id"] != app.id:
                    out.append({"token": token, "reason": "unknown", "unregistered_at": None})
                else:
                    out.append({"token": token, "reason": row["retired_reason"] or "retired",
                                "unregistered_at": row["retired_at"]})
            return out
        return await self.store.read(lookup)

    async def handle_status(self, request: web.Request) -> web.Response:
        app = self._app(request)
        mid = request.match_info["id"]
        if not is_message_id(mid):
            raise ApiError(E.BAD_MESSAGE_ID, f"{mid[:64]!r} is not a message id")
        status = await self.store.read(sql_messages.message_status, app.id, mid, self.settings.status_detail_limit)
        if status is None:
            raise ApiError(E.MESSAGE_NOT_FOUND)
        return web.json_response(status)

    async def handle_cancel(self, request: web.Request) -> web.Response:
        app = self._app(request)
        mid = request.match_info["id"]
        if not is_message_id(mid):
            raise ApiError(E.BAD_MESSAGE_ID, f"{mid[:64]!r} is not a message id")
        cancelled = await self.store.write(sql_messages.cancel_message, app.id, mid, self.dispatcher.clock())
        if cancelled is None:
            raise ApiError(E.MESSAGE_NOT_FOUND)
        return web.json_response({"id": mid, "cancelled": cancelled})

    async def handle_alias_contact(self, request: web.Request) -> web.Response:
        """Set the phone and e-mail used for fallback to every device enrolled under an alias."""
        app = self._app(request)
        alias = request.match_info["alias"]
        if not 1 <= len(alias) <= 128:
            raise ApiError(E.INVALID_REQUEST, "alias: 1-128 characters")
        contact: Contact = validate(Contact, await read_json(request))
        await self.accounts.set_alias_contact(app.id, alias, contact.phone, contact.email)
        return web.json_response({"alias": alias, "phone": contact.phone, "email": contact.email})

    # -- topics ----------------------------------------------------------------------------------
    async def handle_subscribe(self, request: web.Request) -> web.Response:
        return await self._subscription(request, subscribe=True)

    async def handle_unsubscribe(self, request: web.Request) -> web.Response:
        return await self._subscription(request, subscribe=False)

    async def _subscription(self, request: web.Request, subscribe: bool) -> web.Response:
        app = self._app(request)
        topic = request.match_info["topic"]
        if not (1 <= len(topic) <= 64 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in topic)):
            raise ApiError(E.BAD_TOPIC_NAME, f"{topic[:80]!r} is not a valid topic name")
        req: Subscribers = validate(Subscribers, await read_json(request))
        if len(req.tokens) > self.settings.max_tokens:
            raise ApiError(E.TOO_MANY_TOKENS, f"{len(req.tokens)} tokens; at most {self.settings.max_tokens}")
        found, unregistered, _ = await self._resolve(app, Target(tokens=req.tokens))
        if found:
            await self.accounts.set_subscription(app.id, topic, found, subscribe)
        key = "subscribed" if subscribe else "unsubscribed"
        return web.json_response({"topic": topic, key: len(found), "unregistered": unregistered,
                                  "subscribers": len(self.directory.topics.get((app.id, topic), {}))})
