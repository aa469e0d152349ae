"""The sign-in throttle's whole policy table (tests/unit/test_throttle.py) against RedisThrottleStore."""

import pytest
from unit.test_throttle import *  # noqa: F403 - the same tests, collected again here with the fixture below
from unit.test_throttle import policy

from relay.throttle import RedisThrottleStore


@pytest.fixture
def throttle(redis_server):
    store = RedisThrottleStore(redis_server.url, prefix="t")
    yield policy(store)
    store._client.close()
