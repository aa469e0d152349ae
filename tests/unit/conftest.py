"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from app import create_app


@pytest.fixture
def app(tmp_path):
    """A Flask app built by the factory, its files under ``tmp_path`` (nothing started)."""
    return create_app(
        {
            "REALTIME_DB": str(tmp_path / "users.db"),
            "REALTIME_INSTANCE_PATH": str(tmp_path / "instance"),
            "SECRET_KEY": "unit-test-session-key-0123456789abcdefghij",
            "TESTING": True,
        }
    )
