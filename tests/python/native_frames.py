"""Reading the native protocol one JSON object at a time.

A text frame from the server carries one or more JSON objects, one per line (docs/PROTOCOL.md,
"Frames"): a client splits it on "\\n" only (not str.splitlines, which also splits on other
characters a JSON string may hold raw).
"""

import asyncio
import collections
import json


class NativeReader:
    def __init__(self, ws):
        self.ws = ws
        self.lines = collections.deque()

    def pending(self):
        """Objects already received but not read yet."""
        return list(self.lines)

    async def next(self, timeout=10):
        while not self.lines:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            self.lines.extend(split_frame(frame))
        return self.lines.popleft()


def split_frame(frame):
    if isinstance(frame, bytes):
        frame = frame.decode()
    return [json.loads(line) for line in frame.split("\n")]

