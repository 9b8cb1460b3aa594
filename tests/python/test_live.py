"""A list view kept live by deltas, driven by PyPI `websockets` as a browser would."""

import asyncio
import json
import random

from native_frames import NativeReader
from websockets.asyncio.client import connect

FILTER = ["and", ["==", "color", "blue"], [">=", "age", 21]]
TIMEOUT = 10


def matches(row):
    return row.get("color") == "blue" and row.get("age", -1) >= 21


class App:
    """The app's side: its table, and the deltas it reports to Plaza."""

    def __init__(self, plaza, rng):
        self.plaza, self.rng, self.table = plaza, rng, {}

    def change(self):
        rid = self.rng.randrange(40)
        row = {"id": rid, "color": self.rng.choice(["blue", "red", "green"]),
               "age": self.rng.randrange(15, 31), "name": f"p{rid}"}
        old = self.table.get(rid)
        if old is None:
            delta = {"type": "insert", "model": "Player", "data": row}
            self.table[rid] = row
        elif self.rng.random() < 0.25:
            delta = {"type": "delete", "model": "Player", "data": old}
            del self.table[rid]
        else:
            delta = {"type": "update", "model": "Player", "oldData": old, "newData": row}
            self.table[rid] = row
        status, body = self.plaza.api("POST", "/api/deltas", [delta])
        assert status == 200, body
        return delta

    def view(self):
        return {rid: row for rid, row in self.table.items() if matches(row)}


def apply(view, delta):
    if delta["type"] == "insert":
        view[delta["data"]["id"]] = delta["data"]
    elif delta["type"] == "update":
        view[delta["newData"]["id"]] = delta["newData"]
    else:
        view.pop(delta["data"]["id"], None)


def test_list_view_follows_the_app_table(plaza):
    async def scenario():
        rng = random.Random(7)
        app = App(plaza, rng)
        for _ in range(60):
            app.change()
        # The app authorises the view, reads its table for the first page, then keeps changing
        # data before the client has redeemed the token: those deltas must not be lost.
        status, body = plaza.api("POST", "/api/live/authorize",
                                 {"items": [{"dealer": "players", "query": FILTER}]})
        assert status == 200, body
        token = json.loads(body)["token"]
        snapshot = app.view()
        moves = {"in": 0, "out": 0}
        for _ in range(20):
            app.change()

        async with connect(plaza.ws_url) as ws:
            frames = NativeReader(ws)
            await ws.send(json.dumps({"id": 1, "method": "connect"}))
            assert "result" in await frames.next(TIMEOUT)
            await ws.send(json.dumps({"id": 2, "method": "live_subscribe", "params": {"token": token}}))
            reply = await frames.next(TIMEOUT)
            [sub] = reply["result"]["subscriptions"]
            view = dict(snapshot)
            for _ in range(300):
                delta = app.change()
                if delta["type"] == "update":
                    was, now = matches(delta["oldData"]), matches(delta["newData"])
                    moves["in"] += (not was) and now
                    moves["out"] += was and not now
            # A last row that matches marks the end of the stream.
            status, _ = plaza.api("POST", "/api/deltas", [
                {"type": "insert", "model": "Player",
                 "data": {"id": "end", "color": "blue", "age": 99}}])
            assert status == 200
            while True:
                push = await frames.next(TIMEOUT)
                assert push["push"] == "delta" and push["subscription"] == sub, push
                if push["delta"].get("data", {}).get("id") == "end":
                    break
                apply(view, push["delta"])
            assert view == app.view()
        # The random walk really moved rows into and out of the view.
        assert moves["in"] > 5 and moves["out"] > 5, moves

    asyncio.run(asyncio.wait_for(scenario(), 60))
