"""The native protocol driven by PyPI `websockets`, a client no one here wrote."""

import asyncio
import json
import socket

import pytest
from native_frames import NativeReader, split_frame
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.reader = NativeReader(ws)
        self.next_id = 0
        self.pushes = []

    async def request(self, method, params=None):
        self.next_id += 1
        frame = {"id": self.next_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.ws.send(json.dumps(frame))
        return await self.reply(self.next_id)

    async def next(self):
        return await self.reader.next(TIMEOUT)

    async def reply(self, id_):
        while True:
            msg = await self.next()
            if "push" in msg:
                self.pushes.append(msg)
                continue
            assert msg["id"] == id_, msg
            return msg

    async def push(self):
        if self.pushes:
            return self.pushes.pop(0)
        msg = await self.next()
        assert msg.get("push") == "publication", msg
        return msg

    async def silence(self, seconds=0.3):
        assert not self.pushes, self.pushes
        assert not self.reader.pending(), self.reader.pending()
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
            r = await c.next()
            assert r["id"] == id_ and r["error"]["code"] == code, (frame, r)
        await c.ws.send(b"\x00\x01binary")
        r = await c.next()
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


def test_split_frame():
    assert split_frame('{"a":1}') == [{"a": 1}]
    assert split_frame('{"a":"x\\ny"}\n{"b":[1, 2]}') == [{"a": "x\ny"}, {"b": [1, 2]}]
    # U+2028 may appear raw inside a JSON string: only "\n" ends a line.
    assert split_frame('{"s":"a\u2028b"}\n{"t":2}') == [{"s": "a\u2028b"}, {"t": 2}]


def test_pushes_queued_together_share_a_frame(plaza):
    async def scenario():
        c = await open_client(plaza)
        await c.request("subscribe", {"channel": "chat:lines"})
        # 20 publishes (one pretty-printed) in one TCP segment (corked): the server handles
        # them in one go, so its writer finds their replies and pushes queued together.
        sock = c.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for i in range(20):
            data = '{\n  "pretty": [1,\n 2]\n}' if i == 3 else str(i)
            await c.ws.send('{"id":%d,"method":"publish","params":{"channel":"chat:lines","data":%s}}'
                            % (100 + i, data))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        pushes, replies, most = [], 0, 0
        while len(pushes) < 20 or replies < 20:
            lines = split_frame(await asyncio.wait_for(c.ws.recv(), TIMEOUT))
            most = max(most, len(lines))
            for msg in lines:
                if "push" in msg:
                    pushes.append(msg["data"])
                else:
                    assert msg["result"] == {}, msg
                    replies += 1
        assert most > 1
        assert pushes == [i if i != 3 else {"pretty": [1, 2]} for i in range(20)]
        await c.ws.close()

    run(scenario())
