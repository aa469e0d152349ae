"""WSGI entry point: ``gunicorn -k gevent wsgi:app`` (settings in gunicorn.conf.py)."""

import sys

from app import create_app
from relay.config import ConfigError

try:
    app = create_app()
except ConfigError as problem:
    print(f"cannot start: {problem}", file=sys.stderr, flush=True)
    # 4 is gunicorn's "application failed to load": the master stops instead of respawning.
    sys.exit(4)
