"""Browsers on an allowed origin may send `X-Device-Id` (messaging's lastUsedAt stamp)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.server import running_server

ORIGIN = "https://chat.example.com"


async def test_preflight_allows_the_device_id_header(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, http__cors_origins=[ORIGIN]) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        for path in ("/api/chat/messages", "/api/chat/offline-messages"):
            r = await http.options(
                path,
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization, x-device-id",
                },
            )
            assert r.status_code == 204, r.text
            assert r.headers["access-control-allow-origin"] == ORIGIN
            allowed = {
                h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")
            }
            # a browser sends the real request only if every requested header is allowed
            assert {"authorization", "x-device-id"} <= allowed
