"""The core without a web server: admission of a socket, driven on a socketpair."""

import socket
import struct

import gevent
import pytest

from relay.codes import Close
from relay.config import Settings
from relay.directory import Identity
from relay.service import Realtime


class Directory:
    name = "stub"

    def __init__(self, get):
        self._get = get

    def get(self, user_id):
        return self._get(user_id)

    def status(self):
        return {"kind": self.name, "state": "ok"}


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env(
        {"WS_TOKEN_SECRET": "t" * 40, "WS_ADMIN_SECRET": "a" * 40, "SECRET_KEY": "s" * 40}, str(tmp_path)
    )


def admit(settings, get):
    rt = Realtime(settings, directory=Directory(get))
    ours, theirs = socket.socketpair()
    rt.open_socket(ours, rt.tokens.mint("u-1"), remote="test")
    gevent.sleep(0.05)  # let the outbox write
    theirs.settimeout(2)
    return rt, theirs.recv(4096)


def test_an_admitted_socket_first_receives_connected(settings):
    rt, data = admit(settings, lambda uid: Identity(uid, None, None, "nurse", "c-1"))
    assert data[0] == 0x81 and b'"type":"CONNECTED"' in data and b'"userId":"u-1"' in data
    assert rt.hub.stats()["byClinic"] == {"c-1": 1}


def test_a_bug_while_admitting_ends_in_close_1011_not_a_hang(settings):
    def broken(uid):
        raise RuntimeError("a bug in a directory")

    rt, data = admit(settings, broken)
    assert data[0] == 0x88 and struct.unpack("!H", data[2:4])[0] == Close.INTERNAL_ERROR
    assert len(rt.hub) == 0
