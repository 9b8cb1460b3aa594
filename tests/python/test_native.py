"""The native protocol driven by PyPI `websockets`, a client no one here wrote."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.pushes = []

    async def request(self, method, params=None):
        self.next_id += 1
        frame = {"id": self.next_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.ws.send(json.dumps(frame))
        return await self.reply(self.next_id)

    async def reply(self, id_):
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            if "push" in msg:
                self.pushes.append(msg)
                continue
            assert msg["id"] == id_, msg
            return msg

    async def push(self):
        if self.pushes:
            return self.pushes.pop(0)
        msg = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        assert msg.get("push") == "publication", msg
        return msg

    async def silence(self, seconds=0.3):
        assert not self.pushes, self.pushes
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.ws.recv(), seconds)


async def open_client(plaza, do_connect=True):
    ws = await connect(plaza.ws_url, max_size=None)
    c = Client(ws)
    if do_connect:
        r = await c.request("connect", {"name": "pytest"})
        assert r["result"]["protocol"] == 1, r
    return c


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


def test_subscribe_publish_two_subscribers_unsubscribe(plaza):
    async def scenario():
        a, b = await open_client(plaza), await open_client(plaza)
        for c in (a, b):
            assert (await c.request("subscribe", {"channel": "news"}))["result"] == {}
        status, body = plaza.api("POST", "/api/publish", {"channel": "news", "data": {"t": "ü"}})
        assert (status, body) == (200, "{}")
        for c in (a, b):
            assert await c.push() == {"push": "publication", "channel": "news", "data": {"t": "ü"}}
        assert (await a.request("unsubscribe", {"channel": "news"}))["result"] == {}
        plaza.api("POST", "/api/publish", {"channel": "news", "data": 2})
        assert (await b.push())["data"] == 2
        await a.silence()
        await a.ws.close()
        await b.ws.close()

    run(scenario())


def test_client_publish_allowed_and_forbidden(plaza):
    async def scenario():
        c = await open_client(plaza)
        await c.request("subscribe", {"channel": "chat:room"})
        r = await c.request("publish", {"channel": "chat:room", "data": [1, "two"]})
        assert r["result"] == {}, r
        assert (await c.push())["data"] == [1, "two"]
        for channel in ("feed:x", "plain"):
            r = await c.request("publish", {"channel": channel, "data": 1})
            assert r["error"]["code"] == 107, r
        await c.ws.close()

    run(scenario())


BAD_FRAMES = [
    ("{oops", None, 101),
    ("[]", None, 101),
    ('"text"', None, 101),
    ('{"method":"ping"}', None, 101),
    ('{"id":1.5,"method":"ping"}', None, 101),
    ('{"id":7,"method":"teleport"}', 7, 102),
    ('{"id":8}', 8, 101),
    ('{"id":9,"method":"subscribe","params":{}}', 9, 101),
    ('{"id":10,"method":"subscribe","params":{"channel":["x"]}}', 10, 101),
    ('{"id":11,"method":"publish","params":{"channel":"chat:a"}}', 11, 101),
    ('{"id":12,"method":"subscribe","params":{"channel":"%s"}}' % ("c" * 300), 12, 105),
    ('{"id":13,"method":"subscribe","params":{"channel":"nowhere:a"}}', 13, 106),
    ('{"id":14,"method":"publish","params":{"channel":"feed:a","data":1}}', 14, 107),
]


def test_every_bad_input_gets_its_documented_error(plaza):
    async def scenario():
        bystander = await open_client(plaza)
        await bystander.request("subscribe", {"channel": "chat:bystander"})
        before = plaza.metric('plaza_errors_total{kind="bad_request"}')

        c = await open_client(plaza, do_connect=False)
        r = await c.request("subscribe", {"channel": "x"})
        assert r["error"]["code"] == 103, r
        assert (await c.request("connect"))["result"]["client"]
        for frame, id_, code in BAD_FRAMES:
            await c.ws.send(frame)
            r = json.loads(await asyncio.wait_for(c.ws.recv(), TIMEOUT))
            assert r["id"] == id_ and r["error"]["code"] == code, (frame, r)
        await c.ws.send(b"\x00\x01binary")
        r = json.loads(await asyncio.wait_for(c.ws.recv(), TIMEOUT))
        assert r == {"id": None, "error": {"code": 111, "message": r["error"]["message"]}}
        # Still usable.
        assert (await c.request("ping"))["result"] == {}
        assert plaza.metric('plaza_errors_total{kind="bad_request"}') - before == 9

        # Oversize frame: closed with 3500.
        await c.ws.send(json.dumps({"id": 99, "method": "publish",
                                    "params": {"channel": "chat:a", "data": "x" * 70000}}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(c.ws.recv(), TIMEOUT)
        assert closed.value.rcvd.code == 3500

        status, _ = plaza.api("POST", "/api/publish", {"channel": "chat:bystander", "data": "ok"})
        assert status == 200
        assert (await bystander.push())["data"] == "ok"
        await bystander.ws.close()

    run(scenario())


def test_backend_rejects_a_wrong_key_and_bad_json(plaza):
    status, body = plaza.api("POST", "/api/publish", {"channel": "a", "data": 1}, key="nope")
    assert status == 401 and json.loads(body)["error"]["code"] == 112
    status, body = plaza.api("POST", "/api/publish", b"{not json")
    assert status == 400 and json.loads(body)["error"]["message"].startswith("invalid JSON")
