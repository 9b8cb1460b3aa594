"""Records real rsocket-py frames for the Rust RSocket codec tests.

Writes crates/plaza-protocol/tests/fixtures/rsocket_py_0.4.20.json:

- "connections": the raw TCP bytes (24-bit length prefixed frames) each way of a few connections
  between an rsocket-py client and an rsocket-py server, recorded by a proxy between them. The
  client calls the routes the way the chat tutorial's client does (composite metadata, routing,
  a `chat/file-name` entry, request-stream with initial N 2^31-1, a request-channel, CANCEL);
  the server answers as the tutorial's server does. One connection uses 64-byte fragments.
- "frames": single frames (no length prefix) built with rsocket-py's frame classes, for what the
  tutorial never sends: SETUP with lease or resume, LEASE, METADATA_PUSH, REQUEST_N, ...
- "metadata": composite metadata built with rsocket-py's helpers.

Run (creates a venv with rsocket 0.4.20 on first use):

    python3 tests/python/gen_rsocket_fixtures.py
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RSOCKET_VERSION = "0.4.20"
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "plaza-protocol" / "tests" / "fixtures" / f"rsocket_py_{RSOCKET_VERSION}.json"


def ensure_rsocket():
    try:
        import rsocket  # noqa: F401
        return
    except ImportError:
        pass
    venv = Path(os.environ.get("RSOCKET_VENV", Path(tempfile.gettempdir()) / f"plaza-rsocket-{RSOCKET_VERSION}"))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"rsocket=={RSOCKET_VERSION}"], check=True)
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


ensure_rsocket()

from datetime import timedelta  # noqa: E402

from reactivestreams.publisher import DefaultPublisher  # noqa: E402
from reactivestreams.subscriber import DefaultSubscriber  # noqa: E402
from reactivestreams.subscription import DefaultSubscription  # noqa: E402
from rsocket.awaitable.awaitable_rsocket import AwaitableRSocket  # noqa: E402
from rsocket.error_codes import ErrorCode  # noqa: E402
from rsocket.extensions.composite_metadata import CompositeMetadata  # noqa: E402
from rsocket.extensions.helpers import composite, metadata_item, route  # noqa: E402
from rsocket.extensions.mimetypes import WellKnownMimeTypes  # noqa: E402
from rsocket.frame import ErrorFrame, LeaseFrame, MetadataPushFrame  # noqa: E402
from rsocket.frame_builders import (to_cancel_frame, to_keepalive_frame,  # noqa: E402
                                    to_payload_frame, to_request_channel_frame, to_request_n_frame,
                                    to_setup_frame)
from rsocket.helpers import create_response, single_transport_provider  # noqa: E402
from rsocket.payload import Payload  # noqa: E402
from rsocket.routing.request_router import RequestRouter  # noqa: E402
from rsocket.routing.routing_request_handler import RoutingRequestHandler  # noqa: E402
from rsocket.rsocket_client import RSocketClient  # noqa: E402
from rsocket.rsocket_server import RSocketServer  # noqa: E402
from rsocket.streams.stream_from_generator import StreamFromGenerator  # noqa: E402
from rsocket.transports.tcp import TransportTCP  # noqa: E402

FILE_NAME_MIME = b"chat/file-name"
FILES = {}


def file_name(metadata: CompositeMetadata) -> str:
    return metadata.find_by_mimetype(FILE_NAME_MIME)[0].content.decode()


def router_factory():
    router = RequestRouter()

    @router.response("login")
    async def login(payload: Payload):
        return create_response(b"session-" + payload.data)

    @router.response("channel.join")
    async def join(payload: Payload):
        return create_response()

    @router.response("message")
    async def message(payload: Payload):
        return create_response()

    @router.response("file.upload")
    async def upload(payload: Payload, composite_metadata: CompositeMetadata):
        FILES[file_name(composite_metadata)] = payload.data
        return create_response()

    @router.response("file.download")
    async def download(composite_metadata: CompositeMetadata):
        name = file_name(composite_metadata)
        return create_response(FILES[name], composite(metadata_item(name.encode(), FILE_NAME_MIME)))

    @router.stream("channel.users")
    async def channel_users(payload: Payload):
        users = [b"user2", b"user1"]
        return StreamFromGenerator(lambda: ((Payload(u), i == len(users)) for i, u in enumerate(users, 1)))

    @router.stream("messages.incoming")
    async def incoming():
        message = b'{"user": "user1", "content": "hello", "channel": null}'
        return StreamFromGenerator(lambda: iter([(Payload(message), False)]))

    @router.fire_and_forget("statistics")
    async def statistics_fnf(payload: Payload):
        pass

    @router.channel("statistics")
    async def statistics_channel():
        class Statistics(DefaultPublisher, DefaultSubscriber, DefaultSubscription):
            def subscribe(self, subscriber):
                super().subscribe(subscriber)
                subscriber.on_subscribe(self)
                subscriber.on_next(Payload(b'{"user_count": 2, "channel_count": 1}'))

            def on_next(self, value, is_complete=False):
                pass

        handler = Statistics()
        return handler, handler

    return router


class Recorder:
    """TCP proxy recording each connection's bytes in both directions."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.connections = []
        self.next_name = None

    async def handle(self, reader, writer):
        record = {"name": self.next_name, "client_to_server": bytearray(), "server_to_client": bytearray()}
        self.connections.append(record)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src, dst, buf):
            try:
                while data := await src.read(65536):
                    buf.extend(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, record["client_to_server"]),
                             pump(up_reader, writer, record["server_to_client"]))


async def connect(port: int, fragment_size=1_000_000):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return RSocketClient(single_transport_provider(TransportTCP(reader, writer)),
                         metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA,
                         fragment_size_bytes=fragment_size)


async def tutorial_session(client: RSocketClient):
    def rr(data, *items):
        return client.request_response(Payload(data, composite(*items)))

    await rr(b"user1", route("login"))
    await rr(b"channel1", route("channel.join"))
    await AwaitableRSocket(client).request_stream(Payload(b"channel1", composite(route("channel.users"))))

    received = asyncio.Event()

    class Listener(DefaultSubscriber):
        def on_next(self, value, is_complete=False):
            received.set()

    listener = Listener()
    client.request_stream(Payload(metadata=composite(route("messages.incoming")))).subscribe(listener)
    await received.wait()
    listener.subscription.cancel()

    await rr(b'{"user": "user2", "content": "hello", "channel": null}', route("message"))
    await client.fire_and_forget(Payload(b'{"memory_usage": 36244}', composite(route("statistics"))))

    stats = asyncio.Event()

    class Statistics(DefaultPublisher, DefaultSubscriber, DefaultSubscription):
        def on_next(self, value, is_complete=False):
            stats.set()

    handler = Statistics()
    client.request_channel(Payload(metadata=composite(route("statistics"))), publisher=handler).subscribe(handler)
    await stats.wait()
    handler._subscriber.on_next(Payload(b'{"ids": ["users"], "period_seconds": 1}'))
    await asyncio.sleep(0.2)
    handler.subscription.cancel()

    name = metadata_item(b"file_name_1.txt", FILE_NAME_MIME)
    await rr(b"abcdefg1234567", route("file.upload"), name)
    await client.request_response(Payload(metadata=composite(route("file.download"), name)))
    try:
        await rr(b"", route("no.such.route"))
    except RuntimeError:
        pass
    await asyncio.sleep(1.1)  # at least two KEEPALIVE round trips


async def fragmented_session(client: RSocketClient):
    name = metadata_item(b"big.bin", FILE_NAME_MIME)
    await client.request_response(Payload(bytes(range(256)) * 2, composite(route("file.upload"), name)))
    await client.request_response(Payload(metadata=composite(route("file.download"), name)))


async def record_connections():
    async def serve(reader, writer):
        RSocketServer(TransportTCP(reader, writer),
                      handler_factory=lambda: RoutingRequestHandler(router_factory()),
                      fragment_size_bytes=serve.fragment_size)

    serve.fragment_size = 1_000_000
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    recorder = Recorder(server.sockets[0].getsockname()[1])
    proxy = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]

    for name, session, fragment_size in [("tutorial", tutorial_session, 1_000_000),
                                         ("fragmented_64", fragmented_session, 64)]:
        recorder.next_name = name
        serve.fragment_size = fragment_size
        async with await connect(port, fragment_size) as client:
            await asyncio.wait_for(session(client), 20)
        await asyncio.sleep(0.3)

    proxy.close()
    server.close()
    return [{"name": c["name"], "client_to_server": c["client_to_server"].hex(),
             "server_to_client": c["server_to_client"].hex()} for c in recorder.connections]


def single_frames():
    frames = {}

    lease = to_setup_frame(None, b"application/json", b"message/x.rsocket.composite-metadata.v0",
                           timedelta(milliseconds=500), timedelta(minutes=10), honor_lease=True)
    frames["setup_lease"] = lease

    resume = to_setup_frame(Payload(b"setup-data", b"setup-metadata"), b"application/json",
                            b"message/x.rsocket.composite-metadata.v0",
                            timedelta(seconds=2), timedelta(seconds=30))
    resume.flags_resume = True
    resume.resume_identification_token = b"resume-token"
    resume.token_length = len(resume.resume_identification_token)
    frames["setup_resume"] = resume

    frames["keepalive_respond"] = to_keepalive_frame(b"ping")
    frames["request_n"] = to_request_n_frame(3, 16)
    frames["cancel"] = to_cancel_frame(3)
    frames["payload_complete"] = to_payload_frame(5, Payload(), complete=True, is_next=False)
    frames["payload_next_complete_metadata"] = to_payload_frame(
        7, Payload(b"data", composite(metadata_item(b"f.txt", FILE_NAME_MIME))), complete=True)
    frames["request_channel_complete"] = to_request_channel_frame(
        9, Payload(b'{"ids": ["users"]}', composite(route("statistics"))), initial_request_n=2, complete=True)
    push = MetadataPushFrame()
    push.metadata = composite(route("x"))
    frames["metadata_push"] = push

    error = ErrorFrame()
    error.stream_id = 0
    error.error_code = ErrorCode.UNSUPPORTED_SETUP
    error.data = b"lease is not supported"
    frames["error_unsupported_setup"] = error

    app_error = ErrorFrame()
    app_error.stream_id = 11
    app_error.error_code = ErrorCode.APPLICATION_ERROR
    app_error.data = b"No handler for route"
    frames["error_application"] = app_error

    lease_frame = LeaseFrame()
    lease_frame.time_to_live = 1000
    lease_frame.number_of_requests = 5
    lease_frame.metadata = b"lease-metadata"
    frames["lease"] = lease_frame

    return {name: frame.serialize().hex() for name, frame in frames.items()}


def metadata():
    items = {
        "route_login": composite(route("login")),
        "route_two_tags": composite(route("a", "bb")),
        "upload": composite(route("file.upload"), metadata_item(b"file_name_1.txt", FILE_NAME_MIME)),
        "json_entry": composite(metadata_item(b"{}", WellKnownMimeTypes.APPLICATION_JSON)),
    }
    return {name: value.hex() for name, value in items.items()}


def main():
    connections = asyncio.run(record_connections())
    fixture = {
        "generator": "tests/python/gen_rsocket_fixtures.py",
        "rsocket": RSOCKET_VERSION,
        "connections": connections,
        "frames": single_frames(),
        "metadata": metadata(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
