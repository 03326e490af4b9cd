"""The HTTP applications: one route table each, and the one place that turns exceptions into answers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from appliance import errors as E
from appliance.api import edge
from appliance.api.edge import EDGE_LIMITS, EdgeLimits, log_value
from appliance.api.openapi import ApiLimits, openapi_document
from appliance.errors import ApiError

log = logging.getLogger("appliance.api")
MAX_BODY = web.AppKey("max_body_bytes", int)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: ApiError, limits: EdgeLimits | None = None) -> web.Response:
    response = web.json_response(exc.body(), status=exc.kind.http)
    if "retry_after_s" in exc.extra:  # 429: when to come back, as HTTP says it
        response.headers["Retry-After"] = str(exc.extra["retry_after_s"])
    return bounded(response, limits) if limits else response


def bounded(response: web.StreamResponse, limits: EdgeLimits) -> web.StreamResponse:
    """Cut the `unregistered` lists of a big JSON answer to api.max_unregistered_listed entries (#16)."""
    if isinstance(response, web.Response) and isinstance(response.body, bytes) \
            and response.content_type == "application/json":
        smaller = edge.cap_unregistered(response.body, limits.max_unregistered_listed)
        if smaller is not None:
            response.body = smaller
    return response


@web.middleware
async def handle_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Paths and reasons come from the client: log_value escapes them so no request forges a log line (#16).
    path = log_value(request.raw_path)
    limits = request.app.get(EDGE_LIMITS) or EdgeLimits()
    try:
        if request.version < (1, 0):
            raise ApiError(E.MALFORMED_HTTP, "HTTP/1.0 or HTTP/1.1 only")
        edge.check_host(request)
        return bounded(await handler(request), limits)
    except ApiError as exc:
        log.info("event=refused method=%s path=%s code=%d reason=%s", log_value(request.method), path,
                 exc.kind.code, log_value(str(exc)))
        return error_response(exc, limits)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app.get(MAX_BODY)
        return error_response(ApiError(E.BODY_TOO_LARGE, f"the body is over api.max_body_bytes={limit}"))
    except web.HTTPNotFound:
        return error_response(ApiError(E.ROUTE_NOT_FOUND, f"no endpoint {log_value(request.method, 16)} "
                                                          f"{log_value(request.path, 120)}"))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = error_response(ApiError(E.METHOD_NOT_ALLOWED,
                                           f"{log_value(request.method, 16)} is not allowed; use {allowed}"))
        response.headers["Allow"] = allowed
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("event=internal_error method=%s path=%s", log_value(request.method), path)
        return error_response(ApiError(E.INTERNAL))


def build_provider_app(routes: list[web.RouteDef], max_body_bytes: int,
                       limits: EdgeLimits | None = None, contract: ApiLimits | None = None) -> web.Application:
    """What application servers and devices reach; serve it with edge.EdgeRunner so `limits` apply to its
    connections. No metrics here (#9): they are on `metrics.listen` and the admin socket. /healthz says only
    that the box answers, for load balancers. `contract`: the limits /openapi.json states (#16)."""
    app = web.Application(middlewares=[handle_errors], client_max_size=max_body_bytes)
    app[MAX_BODY] = max_body_bytes
    app[EDGE_LIMITS] = limits or EdgeLimits()
    app.add_routes(routes)
    docs_html = resources.files("appliance").joinpath("static/docs.html").read_text(encoding="utf-8")
    document = openapi_document(contract)

    async def handle_openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    async def handle_docs(request: web.Request) -> web.Response:
        return web.Response(text=docs_html, content_type="text/html")

    async def handle_health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.add_routes([
        web.get("/openapi.json", handle_openapi),
        web.get("/docs", handle_docs),
        web.get("/healthz", handle_health),
    ])
    app.on_response_prepare.append(_name_no_versions)
    return app


async def _name_no_versions(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp would announce `Python/3.x aiohttp/3.x` to every client: an attacker's version map (#9)."""
    response.headers["Server"] = edge.SERVER_NAME


def metrics_handler(render: Callable[[], str]) -> Handler:
    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(text=render(), headers={"Content-Type": PROMETHEUS_TEXT})

    return handle_metrics


def build_admin_app(routes: list[web.RouteDef], metrics: Callable[[], str]) -> web.Application:
    app = web.Application(middlewares=[handle_errors], client_max_size=1 << 20)
    app.add_routes([*routes, web.get("/admin/metrics", metrics_handler(metrics))])
    return app


def build_metrics_app(metrics: Callable[[], str]) -> web.Application:
    """The Prometheus scrape target on `metrics.listen`: GET /metrics and nothing else; no request body."""
    app = web.Application(middlewares=[handle_errors], client_max_size=1024)
    app.add_routes([web.get("/metrics", metrics_handler(metrics))])
    return app
