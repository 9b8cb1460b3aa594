"""High-templar compatibility with clients no one here wrote: triggers published with PyPI `pika`
exactly as django-binder's `binder.websocket.trigger()` does (exchange `hightemplar`, routing key
`*`, body `{"data": ..., "rooms": [...]}`), received by PyPI `websockets` speaking the
spine-high-templar wire protocol, with a real HTTP app stub serving `GET /api/bootstrap/`.

Needs RabbitMQ: $PLAZA_TEST_AMQP_URL (scripts/test.sh starts a private node and sets it).
"""

import asyncio
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import Plaza

TIMEOUT = 10
SUCCESS = '{"code": "success"}'


def amqp_url():
    url = os.environ.get("PLAZA_TEST_AMQP_URL")
    if not url:
        pytest.fail("PLAZA_TEST_AMQP_URL is not set: run scripts/test.sh, which starts a private "
                    "RabbitMQ node, or start one and set it")
    return url


class App:
    """The Django app's bootstrap endpoint: answers what the test sets, records what it got."""

    def __init__(self):
        self.status = 200
        self.body = {}
        self.requests = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                app.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = json.dumps(app.body).encode()
                self.send_response(app.status if self.path == "/api/bootstrap/" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/"

    def stop(self):
        self.server.shutdown()


def binder_trigger(data, rooms, routing_key="*", raw=None):
    """django-binder's `trigger(data, rooms)` over RabbitMQ (a BlockingConnection per call)."""
    parsed = urllib.parse.urlparse(amqp_url())
    credentials = pika.PlainCredentials(parsed.username, parsed.password)
    params = pika.ConnectionParameters(parsed.hostname, port=parsed.port, credentials=credentials)
    connection = pika.BlockingConnection(parameters=params)
    channel = connection.channel()
    body = raw if raw is not None else json.dumps({"data": data, "rooms": rooms})
    channel.basic_publish("hightemplar", routing_key=routing_key, body=body)
    connection.close()


@pytest.fixture(scope="module")
def ht():
    app = App()
    app.body = {"allowed_rooms": [{"target": "message", "customer": "*"},
                                  {"target": "message", "customer": "1"},
                                  {"target": "probe"}]}
    server = Plaza(f"""
ping_interval_secs = 0
[hightemplar]
api_url = "{app.url}"
amqp_url = "{amqp_url()}"
""")
    server.app = app
    server.ht_url = f"ws://{server.public}/ws/"
    asyncio.run(asyncio.wait_for(wait_for_consumer(server), 60))
    yield server
    server.stop()
    app.stop()


async def hello(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def wait_for_consumer(server):
    """Triggers a probe room until one arrives: then Plaza's queue is bound."""
    async with connect(server.ht_url) as ws:
        await hello(ws)
        await ws.send(json.dumps({"type": "subscribe", "room": {"target": "probe"}, "requestId": "p"}))
        assert await ws.recv() == SUCCESS
        while True:
            await asyncio.to_thread(binder_trigger, "probe", [{"target": "probe"}])
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                assert frame["requestId"] == "p", frame
                return
            except asyncio.TimeoutError:
                continue


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


async def silence(ws, seconds=2.0):
    with pytest.raises(asyncio.TimeoutError):
        frame = await asyncio.wait_for(ws.recv(), seconds)
        print("unexpected", frame)


def test_hello_and_forwarded_credentials(ht):
    async def body():
        headers = {"Cookie": "sessionid=a; csrftoken=C", "X-Real-IP": "10.9.8.7"}
        async with connect(ht.ht_url + "?token=T", additional_headers=headers,
                           user_agent_header="U") as ws:
            first = await hello(ws)
            assert first["is_authorized"] is True
            assert sorted(json.dumps(r, sort_keys=True) for r in first["allowed_rooms"]) == sorted(
                json.dumps(r, sort_keys=True) for r in ht.app.body["allowed_rooms"])
        path, headers = ht.app.requests[-1]  # names lowercased: HTTP headers ignore case
        assert path == "/api/bootstrap/"
        assert headers["cookie"] == "sessionid=a; csrftoken=C"
        assert headers["user-agent"] == "U"
        assert headers["x-real-ip"] == "10.9.8.7"
        assert headers["x-csrftoken"] == "C"
        assert headers["authorization"] == "Token T"
    run(body())


def test_denied_connection_is_closed_with_1000(ht):
    async def body():
        ht.app.status = 403
        try:
            async with connect(ht.ht_url) as ws:
                assert json.loads(await ws.recv()) == {"is_authorized": False}
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert closed.value.rcvd.code == 1000
        finally:
            ht.app.status = 200
    run(body())


def test_binder_trigger_reaches_each_subscription(ht):
    room = {"target": "message", "customer": "1"}

    async def body():
        async with connect(ht.ht_url) as a, connect(ht.ht_url) as b:
            await hello(a)
            await hello(b)
            await a.send(json.dumps({"type": "subscribe", "room": room, "requestId": "uuid-a"}))
            assert await a.recv() == SUCCESS
            await b.send(json.dumps({"type": "subscribe", "room": room, "requestId": 42}))
            assert await b.recv() == SUCCESS
            await asyncio.to_thread(binder_trigger, {"id": 7, "text": "héllo"}, [room])
            assert await asyncio.wait_for(a.recv(), TIMEOUT) == (
                '{"type": "publish", "data": {"id": 7, "text": "h\\u00e9llo"}, "requestId": "uuid-a"}')
            frame = json.loads(await asyncio.wait_for(b.recv(), TIMEOUT))
            assert frame == {"type": "publish", "data": {"id": 7, "text": "héllo"}, "requestId": 42}
    run(body())


def test_star_admits_but_delivery_is_exact(ht):
    async def body():
        async with connect(ht.ht_url) as ws:
            await hello(ws)
            # Allowed by {"customer": "*"}; a different key set is not.
            await ws.send(json.dumps({"type": "subscribe", "room": {"target": "message", "customer": 5},
                                      "requestId": "five"}))
            assert await ws.recv() == SUCCESS
            await ws.send(json.dumps({"type": "subscribe", "room": {"target": "message"},
                                      "requestId": "x"}))
            assert json.loads(await ws.recv()) == {"code": "error", "message": "room-not-found"}
            await ws.send(json.dumps({"type": "subscribe", "room": {"target": "message", "customer": "*"},
                                      "requestId": "star"}))
            assert await ws.recv() == SUCCESS
            # A trigger to customer 1 reaches neither `5` nor `*`.
            await asyncio.to_thread(binder_trigger, "one", [{"target": "message", "customer": "1"}])
            await silence(ws)
            # A trigger listing both rooms (what backends do) reaches both subscriptions.
            await asyncio.to_thread(binder_trigger, "both", [{"target": "message", "customer": 5},
                                                            {"customer": "*", "target": "message"}])
            got = sorted([json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["requestId"]
                          for _ in range(2)])
            assert got == ["five", "star"]
    run(body())


def test_bad_triggers_and_other_routing_keys_are_dropped(ht):
    room = {"target": "message", "customer": "1"}

    async def body():
        async with connect(ht.ht_url) as ws:
            await hello(ws)
            await ws.send(json.dumps({"type": "subscribe", "room": room, "requestId": "r"}))
            assert await ws.recv() == SUCCESS
            await asyncio.to_thread(binder_trigger, None, None, raw="not json")
            await asyncio.to_thread(binder_trigger, None, None, raw=json.dumps({"rooms": [room]}))
            await asyncio.to_thread(binder_trigger, "wrong key", [room], routing_key="other")
            await silence(ws)
            await asyncio.to_thread(binder_trigger, None, [room])
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == (
                '{"type": "publish", "data": null, "requestId": "r"}')
    run(body())


def test_status_counts_follow_connections_and_rooms(ht):
    async def status(ws):
        await ws.send('{"type": "status"}')
        return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))

    async def body():
        async with connect(ht.ht_url) as a:
            await hello(a)
            base = await status(a)
            assert base["open_connections"] == 1, base
            assert base["num_rooms"] == 0, base
            async with connect(ht.ht_url) as b:
                await hello(b)
                await b.send(json.dumps({"type": "subscribe", "room": {"target": "message", "customer": "1"},
                                         "requestId": "b"}))
                assert await b.recv() == SUCCESS
                now = await status(a)
                assert (now["open_connections"], now["num_rooms"]) == (2, 1), now
            after = await status(a)
            assert (after["open_connections"], after["num_rooms"]) == (1, 0), after
            await a.send("ping")
            assert await a.recv() == "pong"
    run(body())
