"""Snorky peer for scripts/bench-peers.sh: the `pubsub` service on a WebSocket and its backend.

    SNORKY_KEY=... python snorky_server.py WS_PORT BACKEND_PORT

Listens on 127.0.0.1 only: WebSocket at ws://127.0.0.1:WS_PORT/ws (services: `pubsub`), backend
at http://127.0.0.1:BACKEND_PORT/backend (services: `pubsub_backend`, key in X-Backend-Key).
Prints "ready" once listening.

Snorky 0.1.0a4 needs tornado<5, which does not import on Python >= 3.10 without the
`collections` ABC aliases restored first; its `streql` C extension fails on Python >= 3.10, so the
key is compared with hmac.compare_digest instead.
"""

import collections
import collections.abc

for _name in ("MutableMapping", "Mapping", "MutableSet", "Set", "Sequence",
              "MutableSequence", "Callable", "Iterable", "Hashable", "Sized",
              "Container", "Iterator"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

import hmac  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import tornado.ioloop  # noqa: E402
import tornado.web  # noqa: E402

import snorky.request_handlers.http as snorky_http  # noqa: E402
from snorky.request_handlers.websocket import SnorkyWebSocketHandler  # noqa: E402
from snorky.service_registry import ServiceRegistry  # noqa: E402
from snorky.services.pubsub import PubSubBackend, PubSubService  # noqa: E402


def _equals(a, b):
    return hmac.compare_digest(str(a).encode("utf-8"), str(b).encode("utf-8"))


snorky_http.equals = _equals


def main():
    ws_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    key = os.environ["SNORKY_KEY"]
    frontend = ServiceRegistry()
    backend = ServiceRegistry()
    pubsub = PubSubService("pubsub")
    frontend.register_service(pubsub)
    backend.register_service(PubSubBackend("pubsub_backend", pubsub))

    ws_app = tornado.web.Application([
        SnorkyWebSocketHandler.get_route(frontend, "/ws", ping_pong_interval=90),
    ])
    backend_app = tornado.web.Application([
        ("/backend", snorky_http.BackendHTTPHandler,
         {"service_registry": backend, "api_key": key}),
    ])
    ws_app.listen(ws_port, address="127.0.0.1")
    backend_app.listen(backend_port, address="127.0.0.1")
    loop = tornado.ioloop.IOLoop.current()
    signal.signal(signal.SIGTERM, lambda *_: loop.add_callback_from_signal(loop.stop))
    print("ready", flush=True)
    loop.start()


if __name__ == "__main__":
    main()
