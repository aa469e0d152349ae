"""The framework-free core of the clinic realtime service.

Nothing in this package imports Flask: tokens, channel rules, the socket
protocol, the hub, brokers and identity directories can all be used and
tested without a web server. ``app.py`` and ``blueprints/`` are the thin
Flask layer over it.
"""

__version__ = "0.1.0"
