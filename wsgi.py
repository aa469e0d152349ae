"""The serving entry point: ``gunicorn -k gevent wsgi:app`` (settings in gunicorn.conf.py).

Only a serving process imports this module (commands use ``flask --app app``):
in development it first creates the instance folder and any missing secrets,
then builds the app.
"""

import os
import sys

from app import create_app
from relay.config import ConfigError, prepare_instance

try:
    prepare_instance(os.environ)
    app = create_app()
except ConfigError as problem:
    print(f"cannot start: {problem}", file=sys.stderr, flush=True)
    # 4 is gunicorn's "application failed to load": the master stops instead of respawning.
    sys.exit(4)
