"""What the README and the browser client (realtime.js) must say of the server's wire: they are read
by people and run in browsers, and nothing else would notice them drifting apart from relay/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.channels import MAX_CHANNEL_CHARS
from relay.codes import Close

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CLIENT = (ROOT / "static" / "js" / "realtime.js").read_text()


@pytest.mark.parametrize("code", list(Close), ids=[str(int(c)) for c in Close])
def test_each_close_code_is_documented_and_handled_by_the_browser_client(code):
    assert re.search(rf"^\| {int(code)} \|", README, re.MULTILINE), f"{int(code)} missing from the README's close codes"
    assert re.search(rf"^\s+{int(code)}: \"\w+\",", CLIENT, re.MULTILINE), f"{int(code)} missing from CLOSE_ACTIONS"


def test_the_client_refuses_channel_names_only_past_the_servers_own_bound():
    """realtime.js never sends a name no channel can have; a longer bound than the server's would let
    200 such names make a message the server refuses whole, a shorter one would refuse real channels."""
    bound = re.search(r"const POSSIBLE_CHANNEL = /\^\[\\x20-\\x7e\]\{1,(\d+)\}\$/;", CLIENT)
    assert bound is not None and int(bound.group(1)) == MAX_CHANNEL_CHARS
