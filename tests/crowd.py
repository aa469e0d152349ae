"""Many WebSocket clients at once: an asyncio loop in its own thread, driven from sync tests.

(The loop lives in its own thread because Playwright's sync API keeps a loop
running on the main one once a browser test has run.)
"""

from __future__ import annotations

import asyncio
import json
import threading
from urllib.parse import quote

import websockets


class Crowd:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sockets: list = []

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, srv, users: list[str], channels: list[str] | None = None, concurrency: int = 100) -> list:
        """Open one socket per entry of ``users`` (CONNECTED checked, channels subscribed)."""
        gate = asyncio.Semaphore(concurrency)

        async def open_one(user):
            async with gate:
                url = f"{srv.ws_url}?token={quote(srv.token(user), safe='')}"
                ws = await websockets.connect(url, max_queue=None, open_timeout=30, ping_interval=None)
                assert json.loads(await ws.recv())["type"] == "CONNECTED"
                if channels:
                    await ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": channels}}))
                    assert json.loads(await ws.recv())["type"] == "SUBSCRIBED"
                return ws

        async def open_all():
            return await asyncio.gather(*(open_one(user) for user in users))

        opened = self.run(open_all())
        self.sockets.extend(opened)
        return opened

    def drain(self, sockets: list, quiet: float = 1.0) -> list[list[dict]]:
        """Everything each socket receives until it has been quiet for ``quiet`` seconds."""

        async def one(ws):
            got = []
            try:
                while True:
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=quiet)))
            except (TimeoutError, websockets.ConnectionClosed):
                return got

        async def all_():
            return await asyncio.gather(*(one(ws) for ws in sockets))

        return self.run(all_())

    def close_codes(self, sockets: list, timeout: float = 10) -> list[int | None]:
        async def one(ws):
            try:
                await asyncio.wait_for(ws.wait_closed(), timeout)
            except TimeoutError:
                return None
            return ws.close_code

        async def all_():
            return await asyncio.gather(*(one(ws) for ws in sockets))

        return self.run(all_())

    def close(self) -> None:
        async def all_():
            await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)

        try:
            self.run(all_(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
