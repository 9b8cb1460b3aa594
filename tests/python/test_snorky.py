"""Snorky against Plaza with the REAL PyPI backend connector (`snorky==0.1.0a4`, the same code the
Django integration calls) and a PyPI `websockets` client written against the wire description
(seeds-snorky-rsocket.md §1): S5, the backend half of S4 and S6, and the todo demo.

The connector's package pulls in tornado 4.5, which does not import on Python >= 3.10 unless the
`collections` ABC aliases are put back first; they are, before anything of snorky is imported.
"""

import asyncio
import collections
import collections.abc
import json

for _name in ("MutableMapping", "Mapping", "MutableSet", "Sequence", "Callable", "Iterable",
              "Hashable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

import pytest  # noqa: E402
from conftest import KEY, Plaza  # noqa: E402
from snorky.backend import SnorkyBackend, SnorkyError, SnorkyHTTPTransport  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

TIMEOUT = 10

CONFIG = """
ping_interval_secs = 0
[live]
[[live.dealers]]
name = "AllTasks"
model = "Task"
kind = "broadcast"
[[live.dealers]]
name = "TasksByColor"
model = "Task"
kind = "key"
key = "color"
[snorky]
path = "/ws"
"""


@pytest.fixture(scope="module")
def server():
    plaza = Plaza(CONFIG)
    plaza.snorky_ws = f"ws://{plaza.public}/ws"
    yield plaza
    plaza.stop()


def backend(server, key=KEY):
    return SnorkyBackend(SnorkyHTTPTransport(f"http://{server.backend}/backend", key))


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def rpc(ws, service, command, call_id, **params):
    await ws.send(json.dumps({"service": service,
                              "message": {"command": command, "params": params,
                                          "callId": call_id}}))


async def quiet(ws, seconds=0.3):
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"expected nothing, got {frame}")


def test_authorize_subscription_returns_a_32_char_token(server):
    token = backend(server).call("datasync_backend", "authorizeSubscription",
                                 items=[{"dealer": "AllTasks", "query": None}])
    assert isinstance(token, str) and len(token) == 32
    assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789" for c in token)
    assert backend(server).call("datasync_backend", "authorizeSubscription", items=[]) != token


def test_unknown_dealer_is_a_snorky_error(server):
    with pytest.raises(SnorkyError) as e:
        backend(server).call("datasync_backend", "authorizeSubscription",
                             items=[{"dealer": "Nope", "query": 1}])
    assert e.value.args == ("No such dealer",)
    with pytest.raises(SnorkyError) as e:
        backend(server).call("datasync_backend", "publishDeltas",
                             deltas=[{"type": "upsert", "model": "Task", "data": {}}])
    assert e.value.args == ("Invalid delta type",)
    # What made the reference hang answers: an unknown service is an error, not a blocked call.
    with pytest.raises(SnorkyError) as e:
        backend(server).call("nope", "publish", channel="c", message=1)
    assert e.value.args == ("Unknown service",)


def test_a_wrong_key_is_a_runtime_error(server):
    with pytest.raises(RuntimeError) as e:
        backend(server, key="wrong").call("pubsub_backend", "publish", channel="c", message=1)
    assert "401" in str(e.value)


def test_publish_deltas_reaches_a_ws_client(server):
    async def scenario():
        snorky = backend(server)
        token = snorky.call("datasync_backend", "authorizeSubscription",
                            items=[{"dealer": "TasksByColor", "query": "red"}])
        # Published before the client acquires: it waits, then comes before the response.
        assert snorky.call("datasync_backend", "publishDeltas", deltas=[
            {"type": "insert", "model": "Task", "data": {"id": 1, "color": "red"}},
            {"type": "insert", "model": "Task", "data": {"id": 2, "color": "blue"}},
        ]) is None
        async with connect(server.snorky_ws) as ws:
            await rpc(ws, "datasync", "acquireSubscription", 0, token=token)
            assert await recv(ws) == {"service": "datasync", "message": {
                "type": "delta",
                "delta": {"type": "insert", "model": "Task", "data": {"id": 1, "color": "red"}}}}
            assert await recv(ws) == {"service": "datasync",
                                      "message": {"type": "response", "callId": 0, "data": None}}
            snorky.call("datasync_backend", "publishDeltas", deltas=[
                {"type": "update", "model": "Task", "newData": {"id": 2, "color": "red"},
                 "oldData": {"id": 2, "color": "blue"}}])
            assert (await recv(ws))["message"]["delta"] == {
                "type": "insert", "model": "Task", "data": {"id": 2, "color": "red"}}
            await rpc(ws, "datasync", "cancelSubscription", 1, token=token)
            assert (await recv(ws))["message"] == {"type": "response", "callId": 1, "data": None}
            snorky.call("datasync_backend", "publishDeltas", deltas=[
                {"type": "delete", "model": "Task", "data": {"id": 1, "color": "red"}}])
            await quiet(ws)

    asyncio.run(scenario())


def test_pubsub_backend_publish_reaches_subscribers(server):
    async def scenario():
        async with connect(server.snorky_ws) as a, connect(server.snorky_ws) as b:
            for ws in (a, b):
                await rpc(ws, "pubsub", "subscribe", 0, channel="news")
                assert (await recv(ws))["message"]["type"] == "response"
            assert backend(server).call("pubsub_backend", "publish", channel="news",
                                        message={"headline": "ünïcode"}) is None
            for ws in (a, b):
                raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
                # json.dumps layout, non-ASCII escaped, as the reference writes it.
                assert raw == ('{"service": "pubsub", "message": {"type": "message", '
                               '"channel": "news", "message": {"headline": '
                               '"\\u00fcn\\u00efcode"}}}')

    asyncio.run(scenario())


def test_todo_demo(server):
    """The snorky_todo demo: three browsers GET the list with `X-Snorky: Subscribe` (the Django
    mixin calls authorizeSubscription for dealer AllTasks), acquire their token, and follow the
    inserts, updates and deletes the Django signals publish; each array ends equal to the list."""
    snorky = backend(server)
    rows = {}

    def save(task):  # @subscribable: insert, or update with the old row read back first
        if task["id"] in rows:
            delta = {"type": "update", "model": "Task", "newData": task,
                     "oldData": rows[task["id"]]}
        else:
            delta = {"type": "insert", "model": "Task", "data": task}
        rows[task["id"]] = dict(task)
        snorky.call("datasync_backend", "publishDeltas", deltas=[delta])

    def delete(task_id):
        snorky.call("datasync_backend", "publishDeltas",
                    deltas=[{"type": "delete", "model": "Task", "data": rows.pop(task_id)}])

    def apply(items, delta):  # ArrayCollection + CollectionDeltaProcessor, matched by id
        if delta["type"] == "insert":
            items.append(delta["data"])
        elif delta["type"] == "update":
            i = next(i for i, t in enumerate(items) if t["id"] == delta["oldData"]["id"])
            items[i] = delta["newData"]
        else:
            items[:] = [t for t in items if t["id"] != delta["data"]["id"]]

    async def scenario():
        tokens = [snorky.call("datasync_backend", "authorizeSubscription",
                              items=[{"dealer": "AllTasks", "query": None}]) for _ in range(3)]
        browsers = [await connect(server.snorky_ws) for _ in tokens]
        try:
            for ws, token in zip(browsers, tokens):
                await rpc(ws, "datasync", "acquireSubscription", 0, token=token)
                assert (await recv(ws))["message"]["type"] == "response"

            def django():
                save({"id": 1, "title": "buy milk", "completed": False})
                save({"id": 2, "title": "write docs", "completed": False})
                save({"id": 3, "title": "ship", "completed": False})
                save({"id": 2, "title": "write docs", "completed": True})
                delete(1)
                save({"id": 3, "title": "ship it", "completed": False})
                return 6

            published = await asyncio.get_running_loop().run_in_executor(None, django)
            final = sorted(rows.values(), key=lambda t: t["id"])
            assert [t["id"] for t in final] == [2, 3]
            for ws in browsers:
                items = []
                for _ in range(published):
                    frame = await recv(ws)
                    assert frame["service"] == "datasync" and frame["message"]["type"] == "delta"
                    apply(items, frame["message"]["delta"])
                await quiet(ws)
                assert sorted(items, key=lambda t: t["id"]) == final
        finally:
            for ws in browsers:
                await ws.close()

    asyncio.run(scenario())
