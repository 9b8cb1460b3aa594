"""RSocket chat (issue 11) with the real PyPI `rsocket` 0.4.20 client over TCP, written the way
the rsocket-py chat tutorial's client is (RSocketClient, composite(route(...)), AwaitableRSocket,
TransportTCP), plus a few raw-frame checks (SETUP refusals, KEEPALIVE echo, REQUEST_N credit)."""

import asyncio
import json
import socket
import struct

import pytest

from conftest import Plaza

from rsocket.awaitable.awaitable_rsocket import AwaitableRSocket
from rsocket.extensions.helpers import composite, route
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.helpers import single_transport_provider
from rsocket.payload import Payload
from rsocket.rsocket_client import RSocketClient
from rsocket.transports.aiohttp_websocket import TransportAioHttpClient
from rsocket.transports.tcp import TransportTCP
from reactivestreams.subscriber import DefaultSubscriber


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rs():
    """A server per test, so the tests over TCP and WS use the same names."""
    port = free_port()
    config = f"""
ping_interval_secs = 0
[namespaces.rsocket]
client_join = true
[rsocket]
tcp_listen = "127.0.0.1:{port}"
ws_path = "/chat"
open_login = true
"""
    server = Plaza(config)
    server.rsocket_port = port
    yield server
    server.stop()


async def connect(rs, transport: str) -> RSocketClient:
    """TCP (24-bit length prefix) or WebSocket `/chat` (one binary message per frame)."""
    if transport == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", rs.rsocket_port)
        t = TransportTCP(reader, writer)
    else:
        t = TransportAioHttpClient(url=f"ws://{rs.public}/chat")
    return RSocketClient(single_transport_provider(t),
                         metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA)


TRANSPORTS = pytest.mark.parametrize("transport", ["tcp", "ws"])


def rr(client, data: bytes, name: str):
    return client.request_response(Payload(data, composite(route(name))))


async def stream(client, data: bytes, name: str):
    items = await AwaitableRSocket(client).request_stream(Payload(data, composite(route(name))))
    return [p.data.decode() for p in items]


class Inbox(DefaultSubscriber):
    """The tutorial's messages.incoming listener: collects the JSON messages."""

    def __init__(self):
        super().__init__()
        self.messages = []
        self.arrived = asyncio.Event()

    def on_next(self, value, is_complete=False):
        self.messages.append(json.loads(value.data))
        self.arrived.set()

    async def wait_for(self, n: int, timeout=5.0):
        async def loop():
            while len(self.messages) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(loop(), timeout)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@TRANSPORTS
def test_r2_login_returns_session_id(rs, transport):
    async def go():
        async with await connect(rs, transport) as c:
            reply = await rr(c, b"alice", "login")
            assert len(reply.data.decode()) == 36
    run(go())


@TRANSPORTS
def test_r3_channels_and_users(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1, await connect(rs, transport) as u2:
            await rr(u1, b"r3user1", "login")
            await rr(u2, b"r3user2", "login")
            r = await rr(u1, b"r3chan", "channel.join")
            assert r.data == b""
            await rr(u2, b"r3chan", "channel.join")
            assert "r3chan" in await stream(u1, b"", "channels")
            assert sorted(await stream(u1, b"r3chan", "channel.users")) == ["r3user1", "r3user2"]
            await rr(u1, b"r3chan", "channel.leave")
            assert await stream(u2, b"r3chan", "channel.users") == ["r3user2"]
            assert await stream(u2, b"no-such-channel", "channel.users") == []
    run(go())


@TRANSPORTS
def test_r4_private_and_channel_messages(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1, await connect(rs, transport) as u2:
            await rr(u1, b"r4user1", "login")
            await rr(u2, b"r4user2", "login")
            in1, in2 = Inbox(), Inbox()
            u1.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(in1)
            u2.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(in2)
            r = await rr(u1, b'{"user": "r4user2", "content": "x", "channel": null}', "message")
            assert r.data == b""
            await in2.wait_for(1)
            assert in2.messages[0] == {"user": "r4user1", "content": "x", "channel": None}

            await rr(u1, b"r4chan", "channel.join")
            await rr(u2, b"r4chan", "channel.join")
            await rr(u1, b'{"user": null, "content": "to all", "channel": "r4chan"}', "message")
            await in1.wait_for(1)
            await in2.wait_for(2)
            expected = {"user": "r4user1", "content": "to all", "channel": "r4chan"}
            assert in1.messages == [expected]
            assert in2.messages[1] == expected

            # After CANCEL nothing more arrives on the stream.
            in2.subscription.cancel()
            await asyncio.sleep(0.2)
            await rr(u1, b'{"user": "r4user2", "content": "late", "channel": null}', "message")
            await asyncio.sleep(0.5)
            assert len(in2.messages) == 2
    run(go())


@TRANSPORTS
def test_r4_offline_messages_arrive_at_the_next_stream(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1:
            await rr(u1, b"r4offline1", "login")
            async with await connect(rs, transport) as u2:
                await rr(u2, b"r4offline2", "login")
            await rr(u1, b'{"user": "r4offline2", "content": "later", "channel": null}', "message")
            async with await connect(rs, transport) as u2:
                await rr(u2, b"r4offline2", "login")
                inbox = Inbox()
                u2.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(inbox)
                await inbox.wait_for(1)
                assert inbox.messages == [{"user": "r4offline1", "content": "later", "channel": None}]
    run(go())


@TRANSPORTS
def test_r7_errors_keep_the_connection(rs, transport):
    async def go():
        async with await connect(rs, transport) as c:
            with pytest.raises(RuntimeError):
                await rr(c, b'{"user": "x", "content": "y", "channel": null}', "message")
            with pytest.raises(RuntimeError, match="unknown route"):
                await rr(c, b"", "no.such.route")
            with pytest.raises(RuntimeError):
                await c.request_response(Payload(b"x"))  # no route metadata
            await rr(c, b"r7user", "login")
            with pytest.raises(RuntimeError):
                await rr(c, b'{"user": "r7nobody", "content": "y", "channel": null}', "message")
            with pytest.raises(RuntimeError):
                await rr(c, b"not json", "message")
            with pytest.raises(RuntimeError):
                await rr(c, b"", "channels")  # RR to a stream route
            await rr(c, b"r7chan", "channel.join")
            assert "r7chan" in await stream(c, b"", "channels")
            await c.fire_and_forget(Payload(b'{"memory_usage": 1}', composite(route("statistics"))))
            assert (await rr(c, b"r7user", "login")).data
    run(go())


# Raw frames, for what the client library does not let us send.

def frame(stream_id: int, ftype: int, flags: int, body: bytes) -> bytes:
    f = struct.pack(">IH", stream_id, (ftype << 10) | flags) + body
    return len(f).to_bytes(3, "big") + f


def setup_frame(flags=0, metadata_mime=b"message/x.rsocket.composite-metadata.v0", token=b""):
    body = struct.pack(">HHII", 1, 0, 1000, 600000)
    if token:
        body += struct.pack(">H", len(token)) + token
    body += bytes([len(metadata_mime)]) + metadata_mime + bytes([16]) + b"application/json"
    return frame(0, 0x01, flags, body)


def routed(name: str) -> bytes:
    tags = bytes([len(name)]) + name.encode()
    return bytes([0xFE]) + len(tags).to_bytes(3, "big") + tags


def with_metadata(metadata: bytes, data: bytes) -> bytes:
    return len(metadata).to_bytes(3, "big") + metadata + data


def read_frame(sock):
    def exact(n):
        b = b""
        while len(b) < n:
            chunk = sock.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b
    n = int.from_bytes(exact(3), "big")
    f = exact(n)
    stream_id, tf = struct.unpack(">IH", f[:6])
    return stream_id, tf >> 10, tf & 0x3FF, f[6:]


def raw(rs):
    s = socket.create_connection(("127.0.0.1", rs.rsocket_port), timeout=5)
    return s


@pytest.mark.parametrize("flags,token,mime,code", [
    (0x40, b"", b"message/x.rsocket.composite-metadata.v0", 0x002),  # lease
    (0x80, b"tok", b"message/x.rsocket.composite-metadata.v0", 0x002),  # resume
    (0, b"", b"application/json", 0x003),  # not composite metadata
])
def test_r1_bad_setup_is_refused_on_stream_0(rs, flags, token, mime, code):
    s = raw(rs)
    s.sendall(setup_frame(flags, mime, token))
    stream_id, ftype, _, body = read_frame(s)
    assert (stream_id, ftype) == (0, 0x0B)
    assert struct.unpack(">I", body[:4])[0] == code
    assert s.recv(1) == b""  # closed
    s.close()


def test_r1_keepalive_is_echoed(rs):
    s = raw(rs)
    s.sendall(setup_frame())
    s.sendall(frame(0, 0x03, 0x80, struct.pack(">Q", 0) + b"ping"))
    stream_id, ftype, flags, body = read_frame(s)
    assert (stream_id, ftype, flags & 0x80) == (0, 0x03, 0)
    assert body[8:] == b"ping"
    s.close()


def test_r10_request_n_credit_is_honoured(rs):
    s = raw(rs)
    s.sendall(setup_frame())
    s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"r10user")))
    assert read_frame(s)[0] == 1
    for i, chan in enumerate([b"r10a", b"r10b", b"r10c"]):
        sid = 3 + 2 * i
        s.sendall(frame(sid, 0x04, 0x100, with_metadata(routed("channel.join"), chan)))
        assert read_frame(s)[:2] == (sid, 0x0A)
    # REQUEST_STREAM channels with initial N = 1: one element, then nothing until REQUEST_N.
    s.sendall(frame(11, 0x06, 0x100, struct.pack(">I", 1) + with_metadata(routed("channels"), b"")))
    sid, ftype, flags, body = read_frame(s)
    assert (sid, ftype, flags & 0x20) == (11, 0x0A, 0x20)
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        read_frame(s)
    s.settimeout(5)
    s.sendall(frame(11, 0x08, 0, struct.pack(">I", 100)))
    names = [body.decode()]
    while True:
        sid, ftype, flags, body = read_frame(s)
        assert (sid, ftype) == (11, 0x0A)
        if flags & 0x20:
            names.append(body.decode())
        if flags & 0x40:
            break
    assert {"r10a", "r10b", "r10c"} <= set(names)
    s.close()


SECRET = "rsocket-test-secret-0123456789-abcdef"


def hs256(claims: dict) -> bytes:
    import base64
    import hashlib
    import hmac
    import time

    def b64(b: bytes) -> bytes:
        return base64.urlsafe_b64encode(b).rstrip(b"=")
    claims = {"exp": int(time.time()) + 3600, **claims}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    return head + b"." + b64(hmac.new(SECRET.encode(), head, hashlib.sha256).digest())


def test_login_without_open_login_needs_a_connection_token():
    port = free_port()
    server = Plaza(f"""
ping_interval_secs = 0
[auth]
hmac_secret = "{SECRET}"
[namespaces.rsocket]
client_join = true
[rsocket]
tcp_listen = "127.0.0.1:{port}"
""")
    server.rsocket_port = port

    async def go():
        async with await connect(server, "tcp") as c:
            with pytest.raises(RuntimeError, match="login refused"):
                await rr(c, b"mallory", "login")
            with pytest.raises(RuntimeError):
                await rr(c, b"chan", "channel.join")  # still not logged in
            assert (await rr(c, hs256({"sub": "tokuser"}), "login")).data
            await rr(c, b"chan", "channel.join")
            assert await stream(c, b"chan", "channel.users") == ["tokuser"]
    try:
        run(go())
    finally:
        server.stop()
