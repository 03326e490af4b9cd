"""The admin API, served on a Unix socket only (file permissions are its access control)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from appliance.accounts import Accounts
from appliance.api.provider import read_json, validate
from appliance.api.schemas import AppFallbackRequest, NewAppRequest


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
            web.put("/admin/apps/{app}/fallback", self.handle_app_fallback),
            web.get("/admin/devices", self.handle_list_devices),
            web.post("/admin/devices/{token}/revoke", self.handle_revoke),
        ]

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def handle_list_apps(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.list_apps_async())

    async def handle_create_app(self, request: web.Request) -> web.Response:
        req: NewAppRequest = validate(NewAppRequest, await read_json(request))
        created = await self.accounts.create_app_async(req.name)
        return web.json_response(created.as_json(), status=201)

    async def handle_rotate_key(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.rotate_key_async(request.match_info["app"]))

    async def handle_app_fallback(self, request: web.Request) -> web.Response:
        req: AppFallbackRequest = validate(AppFallbackRequest, await read_json(request))
        policy = req.policy.model_dump() if req.policy is not None else None
        return web.json_response(await self.accounts.set_app_fallback_async(request.match_info["app"], policy))

    async def handle_list_devices(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.list_devices_async(request.query.get("app")))

    async def handle_revoke(self, request: web.Request) -> web.Response:
        return web.json_response(await self.accounts.revoke_async(request.match_info["token"]))
