"""RSocket chat (issue 11) with the real PyPI `rsocket` 0.4.20 client over TCP and WebSocket,
written the way the rsocket-py chat tutorial's client is (RSocketClient, composite(route(...)),
AwaitableRSocket, TransportTCP, the aiohttp transport): R2-R7 and R9's flow, statistics, files,
hub-pushed messages.incoming; plus raw-frame checks (SETUP refusals, KEEPALIVE echo and timeout,
REQUEST_N credit, stream ids, a client that does not read)."""

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
        self.times = []
        self.arrived = asyncio.Event()

    def on_next(self, value, is_complete=False):
        self.messages.append(json.loads(value.data))
        self.times.append(asyncio.get_running_loop().time())
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


# ----- statistics (R5) -----

from reactivestreams.publisher import DefaultPublisher  # noqa: E402
from reactivestreams.subscription import DefaultSubscription  # noqa: E402
from rsocket.extensions.composite_metadata import CompositeMetadata  # noqa: E402
from rsocket.extensions.helpers import metadata_item  # noqa: E402

FILE_NAME_MIME = b"chat/file-name"


class StatisticsHandler(DefaultPublisher, DefaultSubscriber, DefaultSubscription):
    """The step 6-8 client's statistics channel: subscriber of the server's samples and
    publisher of the client's requests (sent at once, as the tutorial's handler does)."""

    def __init__(self):
        super().__init__()
        self.samples = []  # (monotonic time, decoded JSON)
        self.arrived = asyncio.Event()

    def on_next(self, payload, is_complete=False):
        self.samples.append((asyncio.get_running_loop().time(), json.loads(payload.data)))
        self.arrived.set()

    def on_error(self, exception):
        self.samples.append((asyncio.get_running_loop().time(), {"error": str(exception)}))
        self.arrived.set()

    def cancel(self):
        self.subscription.cancel()

    def set_requested_statistics(self, ids, period_seconds=1):
        # The tutorial's dataclass always sends both keys.
        self._subscriber.on_next(Payload(json.dumps({"ids": ids, "period_seconds": period_seconds}).encode()))

    async def wait_for(self, n, timeout=10.0):
        async def loop():
            while len(self.samples) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(loop(), timeout)


def listen_for_statistics(client, data=b"") -> StatisticsHandler:
    handler = StatisticsHandler()
    request = Payload(data, metadata=composite(route("statistics")))
    client.request_channel(request, publisher=handler).subscribe(handler)
    return handler


@TRANSPORTS
def test_r5_statistics_period_ids_and_cancel(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1, await connect(rs, transport) as u2:
            await rr(u1, b"r5user1", "login")
            await rr(u2, b"r5user2", "login")
            await rr(u1, b"r5chan", "channel.join")
            # FNF statistics: accepted, no reply; the connection goes on.
            await u1.fire_and_forget(Payload(b'{"memory_usage": 36244}', composite(route("statistics"))))
            stats = listen_for_statistics(u1)
            start = asyncio.get_running_loop().time()
            await stats.wait_for(2)
            assert [s for _, s in stats.samples[:2]] == [{"user_count": 2, "channel_count": 1}] * 2
            # The first sample comes one period (1 s) after the channel opened, then every second.
            first, second = stats.samples[0][0], stats.samples[1][0]
            assert 0.7 <= first - start <= 1.6, first - start
            assert 0.7 <= second - first <= 1.4, second - first

            stats.set_requested_statistics(["users"], period_seconds=2)
            n = len(stats.samples)
            await stats.wait_for(n + 3, timeout=12)
            later = stats.samples[n:]
            # At most one sample of the old settings was already on its way.
            assert all(s == {"user_count": 2, "channel_count": None} for _, s in later[1:]), later
            gaps = [b - a for (a, _), (b, _) in zip(later[1:], later[2:])]
            assert all(1.7 <= g <= 2.5 for g in gaps), gaps

            stats.cancel()
            await asyncio.sleep(0.2)
            n = len(stats.samples)
            await asyncio.sleep(2.5)
            assert len(stats.samples) == n
            assert (await rr(u1, b"r5user1", "login")).data
    run(go())


class BackpressuredControl(DefaultPublisher, DefaultSubscription):
    """The reactivex client's control side: requests wait in a queue and go out only as the
    server grants REQUEST_N (observable_from_queue with backpressure)."""

    def __init__(self):
        super().__init__()
        self.queue = []
        self.credit = 0

    def subscribe(self, subscriber):
        super().subscribe(subscriber)
        subscriber.on_subscribe(self)

    def request(self, n):
        self.credit += n
        self._drain()

    def put(self, data: bytes):
        self.queue.append(Payload(data))
        self._drain()

    def _drain(self):
        while self.credit > 0 and self.queue:
            self.credit -= 1
            self._subscriber.on_next(self.queue.pop(0))


@TRANSPORTS
def test_r5_reactivex_initial_request_and_server_request_n(rs, transport):
    async def go():
        async with await connect(rs, transport) as c:
            await rr(c, b"r5rx", "login")
            control = BackpressuredControl()
            samples = StatisticsHandler()
            c.request_channel(
                Payload(b'{"ids": ["users", "channels"], "period_seconds": 2}', composite(route("statistics"))),
                publisher=control).subscribe(samples)
            await samples.wait_for(2, timeout=8)
            assert samples.samples[0][1] == {"user_count": 1, "channel_count": 0}
            assert 1.6 <= samples.samples[1][0] - samples.samples[0][0] <= 2.5
            # The server granted REQUEST_N for the channel's inbound side.
            assert control.credit > 0
            control.put(b'{"ids": [], "period_seconds": 1}')
            n = len(samples.samples)
            await samples.wait_for(n + 3, timeout=8)
            assert samples.samples[-1][1] == {"user_count": None, "channel_count": None}
            samples.cancel()
    run(go())


def test_r5_bad_statistics_request_is_an_error_on_the_channel(rs):
    async def go():
        async with await connect(rs, "tcp") as c:
            await rr(c, b"r5bad", "login")
            stats = listen_for_statistics(c, b'{"period_seconds": 0}')
            await stats.wait_for(1, timeout=5)
            assert "period_seconds" in stats.samples[0][1]["error"]
            assert (await rr(c, b"r5bad", "login")).data
    run(go())


# ----- files (R6) -----

def file_metadata(route_name: str, name: str):
    return composite(route(route_name), metadata_item(name.encode(), FILE_NAME_MIME))


async def upload(client, name: str, content: bytes):
    return await client.request_response(Payload(content, file_metadata("file.upload", name)))


async def download(client, name: str):
    return await client.request_response(Payload(metadata=file_metadata("file.download", name)))


@TRANSPORTS
def test_r6_file_uploaded_on_one_connection_downloads_on_another(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1, await connect(rs, transport) as u2:
            await rr(u1, b"r6user1", "login")
            await rr(u2, b"r6user2", "login")
            content = b"abcdefg1234567"
            r = await upload(u1, "file_name_1.txt", content)
            assert r.data == b""
            assert await stream(u1, b"", "files") == ["file_name_1.txt"]
            got = await download(u2, "file_name_1.txt")
            assert got.data == content
            names = CompositeMetadata().parse(got.metadata).find_by_mimetype(FILE_NAME_MIME)
            assert [i.content for i in names] == [b"file_name_1.txt"]

            # Binary content at the size limit (1 MiB by default) round-trips byte for byte;
            # the download is larger than one fragment (1 000 000 bytes) and is reassembled.
            big = bytes(range(256)) * 4096
            assert len(big) == 1024 * 1024
            await upload(u2, "big.bin", big)
            assert (await download(u1, "big.bin")).data == big
            # Same name: overwritten.
            await upload(u1, "file_name_1.txt", b"new")
            assert (await download(u2, "file_name_1.txt")).data == b"new"
            assert await stream(u2, b"", "files") == ["big.bin", "file_name_1.txt"]
    run(go())


@TRANSPORTS
def test_r6_size_limit_and_bad_names_are_errors(rs, transport):
    async def go():
        async with await connect(rs, transport) as c:
            await rr(c, b"r6limits", "login")
            with pytest.raises(RuntimeError, match=r"too large: 1048577 bytes, the limit is 1048576"):
                await upload(c, "too-big.bin", b"x" * (1024 * 1024 + 1))
            for bad in ["../etc/passwd", "a/b", "..", "tab\there"]:
                with pytest.raises(RuntimeError):
                    await upload(c, bad, b"x")
            with pytest.raises(RuntimeError, match="no file name"):
                await rr(c, b"x", "file.upload")
            with pytest.raises(RuntimeError, match="no file named"):
                await download(c, "missing.txt")
            assert await stream(c, b"", "files") == []
            await upload(c, "ok.txt", b"fine")
            assert await stream(c, b"", "files") == ["ok.txt"]
    run(go())


def test_r6_files_need_login(rs):
    async def go():
        async with await connect(rs, "tcp") as c:
            with pytest.raises(RuntimeError, match="login"):
                await upload(c, "a.txt", b"x")
    run(go())


# ----- messages.incoming is pushed by the hub -----

@TRANSPORTS
def test_messages_incoming_is_pushed_not_polled(rs, transport):
    async def go():
        async with await connect(rs, transport) as u1, await connect(rs, transport) as u2:
            await rr(u1, b"pushuser1", "login")
            await rr(u2, b"pushuser2", "login")
            before = rs.metric("plaza_subscriptions")
            inbox = Inbox()
            u2.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(inbox)
            # The open stream holds a hub subscription to the user's inbox.
            for _ in range(50):
                if rs.metric("plaza_subscriptions") == before + 1:
                    break
                await asyncio.sleep(0.05)
            assert rs.metric("plaza_subscriptions") == before + 1
            loop = asyncio.get_running_loop()
            latencies = []
            for i in range(15):
                await rr(u1, json.dumps({"user": "pushuser2", "content": f"m{i}", "channel": None}).encode(), "message")
                # From the moment the message is stored (the RR completed) to its arrival: pushed,
                # it is on its way before the RR's reply; polled every 100 ms, it waits ~50 ms.
                stored = loop.time()
                await inbox.wait_for(i + 1)
                latencies.append(max(0.0, inbox.times[i] - stored))
            assert [m["content"] for m in inbox.messages] == [f"m{i}" for i in range(15)]
            latencies.sort()
            assert latencies[len(latencies) // 2] < 0.025, latencies
            inbox.subscription.cancel()
            for _ in range(50):
                if rs.metric("plaza_subscriptions") == before:
                    break
                await asyncio.sleep(0.05)
            assert rs.metric("plaza_subscriptions") == before
    run(go())


def test_messages_incoming_honours_request_n(rs):
    """Raw frames: initial N = 1, three messages waiting; one arrives, the rest only after
    REQUEST_N, in order, and nothing is lost."""
    s = raw(rs)
    s.sendall(setup_frame())
    s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"rnuser")))
    assert read_frame(s)[0] == 1

    async def send_three():
        async with await connect(rs, "tcp") as c:
            await rr(c, b"rnsender", "login")
            for i in range(3):
                await rr(c, json.dumps({"user": "rnuser", "content": f"c{i}", "channel": None}).encode(), "message")
    s.sendall(frame(3, 0x06, 0x100, struct.pack(">I", 1) + with_metadata(routed("messages.incoming"), b"")))
    time_ = __import__("time")
    time_.sleep(0.3)
    run(send_three())
    sid, ftype, flags, body = read_frame(s)
    assert (sid, ftype) == (3, 0x0A) and json.loads(body)["content"] == "c0"
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        read_frame(s)
    s.settimeout(5)
    s.sendall(frame(3, 0x08, 0, struct.pack(">I", 5)))
    got = [json.loads(read_frame(s)[3])["content"] for _ in range(2)]
    assert got == ["c1", "c2"]
    s.close()


# ----- keepalive timeout -----

def setup_with_lifetime(lifetime_ms: int):
    body = struct.pack(">HHII", 1, 0, 200, lifetime_ms)
    mime = b"message/x.rsocket.composite-metadata.v0"
    body += bytes([len(mime)]) + mime + bytes([16]) + b"application/json"
    return frame(0, 0x01, 0, body)


def test_r1_silent_connection_is_closed_after_its_max_lifetime(rs):
    import time
    s = raw(rs)
    s.sendall(setup_with_lifetime(1000))
    start = time.monotonic()
    stream_id, ftype, _, body = read_frame(s)
    elapsed = time.monotonic() - start
    assert (stream_id, ftype) == (0, 0x0B)
    assert struct.unpack(">I", body[:4])[0] == 0x101  # CONNECTION_ERROR
    assert b"max lifetime" in body[4:]
    assert 0.8 <= elapsed <= 2.5, elapsed
    assert s.recv(1) == b""  # closed
    s.close()


def test_r1_keepalives_keep_the_connection_open(rs):
    import time
    s = raw(rs)
    s.sendall(setup_with_lifetime(1000))
    for _ in range(8):  # 2.4 s, past the 1 s lifetime
        s.sendall(frame(0, 0x03, 0x80, struct.pack(">Q", 0)))
        assert read_frame(s)[1] == 0x03
        time.sleep(0.3)
    s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"kauser")))
    assert read_frame(s)[:2] == (1, 0x0A)
    s.close()


# ----- channel.join and the namespace's subscribe policy -----

def test_channel_join_checks_the_subscribe_policy():
    port = free_port()
    server = Plaza(f"""
ping_interval_secs = 0
[namespaces.rsocket]
client_join = true
subscribe = "user"
[rsocket]
tcp_listen = "127.0.0.1:{port}"
open_login = true
""")
    server.rsocket_port = port

    async def go():
        async with await connect(server, "tcp") as alice, await connect(server, "tcp") as bob:
            await rr(alice, b"alice", "login")
            await rr(bob, b"bob", "login")
            await rr(alice, b"room#alice,carol", "channel.join")
            with pytest.raises(RuntimeError, match="permission denied"):
                await rr(bob, b"room#alice,carol", "channel.join")
            assert await stream(bob, b"room#alice,carol", "channel.users") == ["alice"]
    try:
        run(go())
    finally:
        server.stop()


def test_channel_join_refuses_a_token_policy():
    port = free_port()
    server = Plaza(f"""
ping_interval_secs = 0
[auth]
hmac_secret = "{SECRET}"
[namespaces.rsocket]
client_join = true
subscribe = "token"
[rsocket]
tcp_listen = "127.0.0.1:{port}"
open_login = true
""")
    server.rsocket_port = port

    async def go():
        async with await connect(server, "tcp") as c:
            await rr(c, b"tokuser", "login")
            with pytest.raises(RuntimeError, match="permission denied"):
                await rr(c, b"secret", "channel.join")
            assert await stream(c, b"", "channels") == []
    try:
        run(go())
    finally:
        server.stop()


# ----- R9: the tutorial's final client flow -----
#
# The tutorial's own scripts (rsocket-py examples/tutorial) are not vendored here; this client is
# written the way its step 8 ChatClient is (same calls, same payloads, same order in main()), and
# runs over TCP (steps 3-7, reactivex) and WebSocket /chat (step 8).

class TutorialChatClient:
    def __init__(self, rsocket):
        self._rsocket = rsocket
        self._username = None
        self.received = []

    async def login(self, username):
        self._username = username
        response = await self._rsocket.request_response(Payload(username.encode(), composite(route("login"))))
        return response.data.decode()

    async def join(self, channel_name):
        await self._rsocket.request_response(Payload(channel_name.encode(), composite(route("channel.join"))))

    async def leave(self, channel_name):
        await self._rsocket.request_response(Payload(channel_name.encode(), composite(route("channel.leave"))))

    def listen_for_messages(self):
        client = self

        class MessageListener(DefaultSubscriber, DefaultSubscription):
            def on_next(self, value, is_complete=False):
                client.received.append(json.loads(value.data))

            def cancel(self):
                self.subscription.cancel()

        listener = MessageListener()
        self._rsocket.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(listener)
        return listener

    async def send_statistics(self):
        import resource
        memory_usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await self._rsocket.fire_and_forget(Payload(json.dumps({"memory_usage": memory_usage}).encode(),
                                                    metadata=composite(route("statistics"))))

    def listen_for_statistics(self):
        return listen_for_statistics(self._rsocket)

    async def private_message(self, username, content):
        await self._rsocket.request_response(Payload(
            json.dumps({"user": username, "content": content, "channel": None}).encode(), composite(route("message"))))

    async def channel_message(self, channel, content):
        await self._rsocket.request_response(Payload(
            json.dumps({"user": None, "content": content, "channel": channel}).encode(), composite(route("message"))))

    async def upload(self, file_name, content):
        await upload(self._rsocket, file_name, content)

    async def download(self, file_name):
        return await download(self._rsocket, file_name)

    async def list_files(self):
        return await stream(self._rsocket, b"", "files")

    async def list_channels(self):
        return await stream(self._rsocket, b"", "channels")

    async def list_channel_users(self, channel_name):
        return await stream(self._rsocket, channel_name.encode(), "channel.users")


@TRANSPORTS
def test_r9_tutorial_client_flow(rs, transport):
    async def go():
        async with await connect(rs, transport) as client1, await connect(rs, transport) as client2:
            user1, user2 = TutorialChatClient(client1), TutorialChatClient(client2)
            assert await user1.login("user1")
            assert await user2.login("user2")

            # messaging_example
            sub1, sub2 = user1.listen_for_messages(), user2.listen_for_messages()
            await user1.join("channel1")
            await user2.join("channel1")
            assert await user1.list_channels() == ["channel1"]
            assert sorted(await user1.list_channel_users("channel1")) == ["user1", "user2"]
            await user1.private_message("user2", "private message from user1")
            await user1.channel_message("channel1", "channel message from user1")
            await asyncio.sleep(1)
            await user1.leave("channel1")
            assert await user1.list_channel_users("channel1") == ["user2"]
            sub1.cancel()
            sub2.cancel()
            assert user1.received == [
                {"user": "user1", "content": "channel message from user1", "channel": "channel1"}]
            assert user2.received == [
                {"user": "user1", "content": "private message from user1", "channel": None},
                {"user": "user1", "content": "channel message from user1", "channel": "channel1"}]

            # files_example
            await user1.upload("file_name_1.txt", b"abcdefg1234567")
            assert await user1.list_files() == ["file_name_1.txt"]
            assert (await user2.download("file_name_1.txt")).data == b"abcdefg1234567"

            # statistics_example (shortened: 2.5 s per phase instead of 5)
            await user1.send_statistics()
            control = user1.listen_for_statistics()
            await asyncio.sleep(2.5)
            control.set_requested_statistics(["users"])
            await asyncio.sleep(2.5)
            control.cancel()
            samples = [s for _, s in control.samples]
            assert {"user_count": 2, "channel_count": 1} in samples
            assert samples[-1] == {"user_count": 2, "channel_count": None}
    run(go())


def test_a_stream_id_in_use_is_a_connection_error(rs):
    s = raw(rs)
    s.sendall(setup_frame())
    s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"dupuser")))
    assert read_frame(s)[0] == 1
    incoming = frame(3, 0x06, 0x100, struct.pack(">I", 10) + with_metadata(routed("messages.incoming"), b""))
    s.sendall(incoming + incoming)
    stream_id, ftype, _, body = read_frame(s)
    assert (stream_id, ftype) == (0, 0x0B)
    assert struct.unpack(">I", body[:4])[0] == 0x101
    assert b"already in use" in body[4:]
    assert s.recv(1) == b""  # closed
    s.close()


def test_messages_incoming_survives_its_queue_overflowing_while_without_credit():
    """A small queue (2 KiB) overflows while the stream has no credit; once credit comes, every
    message arrives once, in order (the stream attaches again from what it acknowledged)."""
    port = free_port()
    server = Plaza(f"""
ping_interval_secs = 0
[limits]
max_queue_bytes = 2048
[namespaces.rsocket]
client_join = true
[rsocket]
tcp_listen = "127.0.0.1:{port}"
open_login = true
""")
    server.rsocket_port = port
    try:
        s = raw(server)
        s.sendall(setup_frame())
        s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"ovuser")))
        assert read_frame(s)[0] == 1
        s.sendall(frame(3, 0x06, 0x100, struct.pack(">I", 1) + with_metadata(routed("messages.incoming"), b"")))
        __import__("time").sleep(0.3)

        async def send_many():
            async with await connect(server, "tcp") as c:
                await rr(c, b"ovsender", "login")
                for i in range(60):
                    content = f"m{i}-" + "x" * 100
                    await rr(c, json.dumps({"user": "ovuser", "content": content, "channel": None}).encode(), "message")
        run(send_many())
        first = json.loads(read_frame(s)[3])["content"]
        assert first.startswith("m0-")
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            read_frame(s)
        s.settimeout(10)
        s.sendall(frame(3, 0x08, 0, struct.pack(">I", 1000)))
        got = [json.loads(read_frame(s)[3])["content"].split("-")[0] for _ in range(59)]
        assert got == [f"m{i}" for i in range(1, 60)]
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            read_frame(s)  # no duplicates
        s.close()
    finally:
        server.stop()


def test_a_client_that_does_not_read_is_closed(rs):
    """40 downloads of 1 MiB requested, nothing read: the unsent frames pass the connection's
    limit (max_queue_bytes + 2 x max_file_size), so the server closes it rather than buffer
    40 MiB."""
    import time
    name = b"big.bin"
    file_entry = bytes([len(FILE_NAME_MIME) - 1]) + FILE_NAME_MIME + len(name).to_bytes(3, "big") + name

    s = raw(rs)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(setup_frame())
    s.sendall(frame(1, 0x04, 0x100, with_metadata(routed("login"), b"slowreader")))
    assert read_frame(s)[0] == 1
    s.sendall(frame(3, 0x04, 0x100, with_metadata(routed("file.upload") + file_entry, b"z" * (1024 * 1024))))
    assert read_frame(s)[:2] == (3, 0x0A)
    for i in range(40):
        s.sendall(frame(5 + 2 * i, 0x04, 0x100, with_metadata(routed("file.download") + file_entry, b"")))
    time.sleep(4)
    received = 0
    s.settimeout(10)
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += len(chunk)
    assert received < 20 * 1024 * 1024, received
    s.close()
