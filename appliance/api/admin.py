"""The admin API, served on a Unix socket only (file permissions are its access control). Every change is
written to the audit log under the Unix user who made it (SO_PEERCRED of the socket's peer)."""

from __future__ import annotations

import pwd
import socket
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import web

from appliance import errors as E
from appliance.accounts import Accounts
from appliance.api.provider import read_json, validate
from appliance.api.schemas import (AppFallbackRequest, EnrollmentPolicyRequest, LimitsRequest, NewAppRequest,
                                   RotateRequest)
from appliance.errors import ApiError

AUDIT_PAGE_MAX = 1000


def unix_actor(uid: int, pid: int | None = None) -> str:
    """`unix:<user>` (uid when it has no name), the form audit entries name a person by."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"unix:{name}" + (f" pid={pid}" if pid else "")


def peer_actor(request: web.Request) -> str:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "unix:unknown"
    pid, uid, _ = struct.unpack("3i", creds)
    return unix_actor(uid, pid)


async def optional_json(request: web.Request) -> Any:
    return await read_json(request) if request.can_read_body else {}


def _int_query(request: web.Request, name: str, default: int | None, maximum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ApiError(E.INVALID_REQUEST, f"{name}: a whole number from 1 to {maximum}")
    return int(raw)


class AdminApi:
    def __init__(self, accounts: Accounts, status: Callable[[], dict[str, Any]]) -> None:
        self.accounts = accounts
        self.status = status

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/admin/status", self.handle_status),
            web.get("/admin/apps", self.handle_list_apps),
            web.post("/admin/apps", self.handle_create_app),
            web.post("/admin/apps/{app}/rotate-key", self.handle_rotate_key),
            web.post("/admin/apps/{app}/rotate-secret", self.handle_rotate_secret),
            web.put("/admin/apps/{app}/fallback", self.handle_app_fallback),
            web.put("/admin/apps/{app}/enrollment", self.handle_app_enrollment),
            web.put("/admin/apps/{app}/limits", self.handle_app_limits),
            web.get("/admin/devices", self.handle_list_devices),
            web.post("/admin/devices/{token}/revoke", self.handle_revoke),
            web.get("/admin/audit", self.handle_audit),
        ]

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def handle_list_apps(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.list_apps_async())

    async def handle_create_app(self, request: web.Request) -> web.Response:
        req: NewAppRequest = validate(NewAppRequest, await read_json(request))
        created = await self.accounts.create_app_async(req.name, peer_actor(request))
        return web.json_response(created.as_json(), status=201)

    async def handle_rotate_key(self, request: web.Request) -> web.Response:
        req: RotateRequest = validate(RotateRequest, await optional_json(request))
        return web.json_response(await self.accounts.rotate_key_async(request.match_info["app"], req.grace_s,
                                                                      peer_actor(request)))

    async def handle_rotate_secret(self, request: web.Request) -> web.Response:
        req: RotateRequest = validate(RotateRequest, await optional_json(request))
        return web.json_response(await self.accounts.rotate_secret_async(request.match_info["app"], req.grace_s,
                                                                         peer_actor(request)))

    async def handle_app_fallback(self, request: web.Request) -> web.Response:
        req: AppFallbackRequest = validate(AppFallbackRequest, await read_json(request))
        policy = req.policy.model_dump() if req.policy is not None else None
        return web.json_response(await self.accounts.set_app_fallback_async(request.match_info["app"], policy,
                                                                            peer_actor(request)))

    async def handle_app_enrollment(self, request: web.Request) -> web.Response:
        req: EnrollmentPolicyRequest = validate(EnrollmentPolicyRequest, await read_json(request))
        return web.json_response(await self.accounts.set_enrollment_async(request.match_info["app"],
                                                                          req.require_ticket, peer_actor(request)))

    async def handle_app_limits(self, request: web.Request) -> web.Response:
        req: LimitsRequest = validate(LimitsRequest, await read_json(request))
        return web.json_response(await self.accounts.set_limits_async(
            request.match_info["app"], req.pushes_per_s, req.targets_per_min, peer_actor(request)))

    async def handle_list_devices(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.list_devices_async(request.query.get("app")))

    async def handle_revoke(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.revoke_async(request.match_info["token"], peer_actor(request)))

    async def handle_audit(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", 100, AUDIT_PAGE_MAX)
        before = _int_query(request, "before", None, 2**62)
        return web.json_response(await self.accounts.audit_async(request.query.get("app"), before, limit or 100))
