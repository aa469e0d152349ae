"""The stack's floor: what gunicorn -k gevent, Flask and Flask-Sock cost per connect, with nothing of ours.

``python bench/run.py --connect-storm --floor`` serves this instead of the
project. Flask-Sock answers the upgrade exactly as it does for the project
(same options: no reader thread), the socket is detached the same way, and
then a libev watcher answers: CONNECTED at once, SUBSCRIBED to any frame. No
token, no identity, no session, no hooks, no log line, no history. The
project's connect time divided by this one is what our own work costs; this
one divided by node-ws's is what the fixed stack costs.
"""

import _socket

from flask import Flask
from flask_sock import Sock
from gevent import get_hub


class _NoThread:
    name = "unused"

    def __init__(self, *args, **kwargs):
        pass

    def start(self) -> None:
        pass


def _text_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


CONNECTED = _text_frame(b'{"type":"CONNECTED","data":{"clientId":"floor","userId":"floor"}}')
SUBSCRIBED = _text_frame(b'{"type":"SUBSCRIBED","data":{"channels":["system:announcements"]}}')

app = Flask(__name__)
app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": _NoThread, "event_class": _NoThread}
sock = Sock(app)
_open: dict[int, tuple] = {}  # fd -> (socket, watcher): kept alive until the client leaves


def _on_readable(raw: _socket.socket, watcher) -> None:
    try:
        data = raw.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        watcher.stop()
        _open.pop(raw.fileno(), None)
        raw.close()
        return
    raw.send(SUBSCRIBED)  # a bench client sends one SUBSCRIBE, and nothing else but a close


@sock.route("/ws")
def socket(ws) -> None:
    ws.connected = False  # as blueprints/socket.py: Flask-Sock's closing ws.close() becomes a no-op
    raw = _socket.socket(fileno=ws.sock.detach())
    raw.setblocking(False)
    raw.send(CONNECTED)
    watcher = get_hub().loop.io(raw.fileno(), 1)
    watcher.start(_on_readable, raw, watcher)
    _open[raw.fileno()] = (raw, watcher)


@app.post("/broadcast")
def broadcast():
    return {"delivered": 0}


@app.get("/health")
def health():
    return {"ok": True, "clients": len(_open)}
