"""The app High-templar asks on every connection (`GET /api/bootstrap/`), for
scripts/bench-peers.sh: every connection may join every room `{"target": ...}`.

    python mock_app.py PORT

Listens on 127.0.0.1:PORT (aiohttp, from the High-templar venv). Prints "ready" once listening.
"""

import sys

from aiohttp import web

BODY = b'{"allowed_rooms": [{"target": "*"}]}'


async def bootstrap(_request):
    return web.Response(body=BODY, content_type="application/json")


def main():
    app = web.Application()
    app.router.add_get("/api/bootstrap/", bootstrap)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=lambda *_: print("ready", flush=True))


if __name__ == "__main__":
    main()
