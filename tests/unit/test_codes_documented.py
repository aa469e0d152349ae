"""Every close code the server sends is in the README's table and has an action in realtime.js."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.codes import Close

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("code", list(Close), ids=[str(int(c)) for c in Close])
def test_each_close_code_is_documented_and_handled_by_the_browser_client(code):
    readme = (ROOT / "README.md").read_text()
    client = (ROOT / "static" / "js" / "realtime.js").read_text()
    assert re.search(rf"^\| {int(code)} \|", readme, re.MULTILINE), f"{int(code)} missing from the README's close codes"
    assert re.search(rf"^\s+{int(code)}: \"\w+\",", client, re.MULTILINE), f"{int(code)} missing from CLOSE_ACTIONS"
