"""Bachata against Plaza with PyPI `websockets`: the acceptance cases B1-B16 of the research notes
(seeds-hightemplar-bachata.md §4.2), in reliable and simple mode, frames compared byte for byte.

B16 is Bachata's own test module (bachata/tests.py, 0.1) ported to a standalone client: it only
imports on Python <= 3.6 (a method named `async`, `loop=` arguments), and its test bodies are short
client scripts, kept here as they are.
"""

import asyncio
import json
import uuid

import pytest
from conftest import Plaza
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


def config(mode):
    return f"""
ping_interval_secs = 0
[bachata]
allow_query_channel = true
mode = "{mode}"
"""


@pytest.fixture(scope="module")
def reliable():
    server = Plaza(config("reliable"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def simple():
    server = Plaza(config("simple"))
    yield server
    server.stop()


def url(server, channel):
    return f"ws://{server.public}/messages?channel={channel}"


def channel():
    return str(uuid.uuid4())


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def silence(ws, seconds=0.3):
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"expected silence, got {frame!r}")


async def open_ready(server, ch):
    ws = await connect(url(server, ch))
    assert await recv(ws) == '{"type": 1000}'
    return ws


def text(id_, dest, data):
    # The example page's message, keys in its order.
    return json.dumps({"id": id_, "type": "text", "dest": dest, "data": data})


def delivered(id_, dest, data, from_):
    return json.dumps({"id": id_, "type": "text", "dest": dest, "data": data, "from": from_})


def got_it(id_):
    return json.dumps({"type": 100, "data": id_})


def receipt(id_):
    return json.dumps({"type": 300, "data": id_})


def ack(id_):
    return json.dumps({"type": 200, "data": id_})


# ----- B16: Bachata's own tests (WebSocketConnTest = simple, WebSocketReliableTest = reliable) -----


@pytest.mark.parametrize("mode", ["simple", "reliable"])
def test_bachata_ws_connection(mode, request):
    server = request.getfixturevalue(mode)

    async def run():
        ws = await connect(url(server, uuid.uuid4()))
        msg = json.loads(await recv(ws))
        assert msg["type"] == 1000
        await ws.send(json.dumps({"type": 1001}))
        msg = json.loads(await recv(ws))
        assert msg["type"] == 1002
        await ws.close()

    asyncio.run(run())


def test_bachata_direct_message_simple(simple):
    async def run():
        ch1, ch2 = str(uuid.uuid4()), str(uuid.uuid4())
        ws1 = await connect(url(simple, ch1))
        ws2 = await connect(url(simple, ch2))
        assert json.loads(await recv(ws1))["type"] == 1000
        assert json.loads(await recv(ws2))["type"] == 1000
        await ws1.send(json.dumps({"id": str(uuid.uuid4()), "type": "test", "dest": ch2, "data": "Hello"}))
        msg = json.loads(await recv(ws2))
        assert msg["type"] == "test"
        await ws1.close()
        await ws2.close()

    asyncio.run(run())


def test_bachata_direct_message_reliable(reliable):
    async def run():
        ch1, ch2 = str(uuid.uuid4()), str(uuid.uuid4())
        ws1 = await connect(url(reliable, ch1))
        ws2 = await connect(url(reliable, ch2))
        assert json.loads(await recv(ws1))["type"] == 1000
        assert json.loads(await recv(ws2))["type"] == 1000
        msg_id = str(uuid.uuid4())
        await ws1.send(json.dumps({"id": msg_id, "type": "test", "dest": ch2, "data": "Hello"}))
        msg = json.loads(await recv(ws1))
        assert msg["type"] == 100 and msg["data"] == msg_id
        msg = json.loads(await recv(ws2))
        assert msg["type"] == "test" and msg["id"] == msg_id
        await ws2.send(json.dumps({"type": 200, "data": msg_id}))
        msg = json.loads(await recv(ws1))
        assert msg["type"] == 300 and msg["data"] == msg_id
        await ws1.close()
        await ws2.close()

    asyncio.run(run())


# ----- B1 to B15 -----


@pytest.mark.parametrize("mode", ["simple", "reliable"])
def test_b1_b2_b3(mode, request):
    server = request.getfixturevalue(mode)

    async def run():
        ws = await open_ready(server, channel())
        await ws.send('{"type":1001}')
        assert await recv(ws) == '{"type": 1002}'
        await ws.close()
        for query in ["?channel=", ""]:
            ws = await connect(f"ws://{server.public}/messages{query}")
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd.code == 1000
            assert closed.value.rcvd.reason == "Error: not authorized for channel access"

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["simple", "reliable"])
def test_b4_b5_b6_b7_b15(mode, request):
    """B4 and B7 in both modes (B15); B5 and B6 in reliable mode, and in simple mode no 300."""
    server = request.getfixturevalue(mode)

    async def run():
        a_ch, b_ch = channel(), channel()
        a = await open_ready(server, a_ch)
        b = await open_ready(server, b_ch)
        await a.send(text("m1", b_ch, "hi"))
        assert await recv(a) == got_it("m1")
        assert await recv(b) == delivered("m1", b_ch, "hi", a_ch)
        await b.send(ack("m1"))
        if mode == "reliable":
            assert await recv(a) == receipt("m1")
        await b.send(ack("m1"))
        await b.send(ack("unknown"))
        await silence(a)
        await b.close()
        # B7: B offline.
        await a.send(text("m2", b_ch, "later"))
        assert await recv(a) == got_it("m2")
        b = await open_ready(server, b_ch)
        assert await recv(b) == delivered("m2", b_ch, "later", a_ch)
        await b.send(ack("m2"))
        if mode == "reliable":
            assert await recv(a) == receipt("m2")
        await silence(a)
        await a.close()
        await b.close()

    asyncio.run(run())


def test_b8_b9(reliable):
    async def run():
        a_ch, b_ch = channel(), channel()
        a = await open_ready(reliable, a_ch)
        b = await open_ready(reliable, b_ch)
        await a.send(text("m3", b_ch, "one"))
        assert await recv(a) == got_it("m3")
        assert await recv(b) == delivered("m3", b_ch, "one", a_ch)
        await b.close()
        await a.send(text("m4", b_ch, "two"))
        assert await recv(a) == got_it("m4")
        await a.close()
        # B8: m3 again right after the 1000, before m4. B9: A is offline when B acks.
        b = await open_ready(reliable, b_ch)
        assert await recv(b) == delivered("m3", b_ch, "one", a_ch)
        assert await recv(b) == delivered("m4", b_ch, "two", a_ch)
        await b.send(ack("m3"))
        await b.send(ack("m4"))
        await silence(b)
        a = await open_ready(reliable, a_ch)
        assert await recv(a) == receipt("m3")
        assert await recv(a) == receipt("m4")
        await a.close()
        await b.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["simple", "reliable"])
def test_b10_to_b14(mode, request):
    server = request.getfixturevalue(mode)

    async def run():
        a_ch, b_ch = channel(), channel()
        a = await open_ready(server, a_ch)
        b = await open_ready(server, b_ch)
        # B10: no 100, no delivery, still open.
        for bad in ['{"type":"text","dest":"%s"}' % b_ch, '{"id":"x","dest":"%s"}' % b_ch, "not json"]:
            await a.send(bad)
        # B13: ignored.
        for t in (100, 300, 1002):
            await a.send(json.dumps({"type": t, "data": "m1"}))
        await silence(a)
        # B11: a 100, no delivery.
        await a.send('{"id":"n1","type":"text","data":"x"}')
        assert await recv(a) == got_it("n1")
        # B12: integer types 7 and 1000 are data.
        for t in (7, 1000):
            await a.send(json.dumps({"id": f"i{t}", "type": t, "dest": b_ch}))
            assert await recv(a) == got_it(f"i{t}")
            assert await recv(b) == json.dumps({"id": f"i{t}", "type": t, "dest": b_ch, "from": a_ch})
        # B14: to one's own channel: the 100, then the message.
        await a.send(text("self", a_ch, "me"))
        assert await recv(a) == got_it("self")
        assert await recv(a) == delivered("self", a_ch, "me", a_ch)
        await silence(b)
        await a.close()
        await b.close()

    asyncio.run(run())


def test_non_ascii_is_escaped_as_python_does(reliable):
    async def run():
        a_ch, b_ch = channel(), channel()
        a = await open_ready(reliable, a_ch)
        b = await open_ready(reliable, b_ch)
        msg = {"id": "u1", "type": "text", "dest": b_ch, "data": "héllo 😀 </b>", "from": "spoof"}
        await a.send(json.dumps(msg, ensure_ascii=False))
        assert await recv(a) == got_it("u1")
        msg["from"] = a_ch
        assert await recv(b) == json.dumps(msg)
        await a.close()
        await b.close()

    asyncio.run(run())
