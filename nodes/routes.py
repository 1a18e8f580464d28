"""The HTTP route the frontend extension (``web/js/nextscale.js``) reads: the classes of a generator choice, so that
the VAR samplers' class menu lists only the classes of the generator connected to them."""

from __future__ import annotations

from aiohttp import web

from .model_files import generator_class_names

CLASS_NAMES_ROUTE = "/nextscale/class_names"


async def class_names(request: web.Request) -> web.Response:
    """``GET /nextscale/class_names?generator=<choice>``: ``{"class_names": [...]}``, or ``null`` where the classes
    are not known without loading the file (the menu then keeps every class)."""
    return web.json_response({"class_names": generator_class_names(request.query.get("generator", ""))})


def register_routes() -> None:
    """Add the route to ComfyUI's running server (before it builds its routes, which serves it under ``/api`` too).
    ``server`` is imported here: importing the node layer must not start one."""
    from server import PromptServer

    PromptServer.instance.routes.get(CLASS_NAMES_ROUTE)(class_names)
