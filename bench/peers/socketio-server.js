// Socket.IO 4 peer for scripts/bench-peers.sh: rooms and broadcasts, nothing else.
//
//   PORT=NNNN node socketio-server.js
//
// Listens on 127.0.0.1:$PORT (WebSocket transport only, no compression). Events:
//   join(room, ack)           joins `room`, then acks
//   publish(room, data, ack)  emits `m(data)` to every socket in `room`, then acks
// Prints "ready" on stdout once listening.
'use strict';

const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT);
if (!Number.isInteger(port) || port <= 0) {
  console.error('socketio-server: set PORT');
  process.exit(1);
}

const httpServer = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const io = new Server(httpServer, {
  serveClient: false,
  transports: ['websocket'],
  perMessageDeflate: false,
  httpCompression: false,
  pingInterval: 25000,
  pingTimeout: 20000,
});

io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    socket.join(String(room));
    if (typeof ack === 'function') ack();
  });
  socket.on('publish', (room, data, ack) => {
    io.to(String(room)).emit('m', data);
    if (typeof ack === 'function') ack();
  });
});

httpServer.listen(port, '127.0.0.1', () => {
  console.log('ready');
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    io.close();
    process.exit(0);
  });
}
