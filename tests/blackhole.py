"""A TCP proxy that can turn its connections half-open: the peer stays connected but nothing
arrives any more, as when a failover, a NAT or a firewall drops a flow without a reset."""

import socket
import threading


class BlackHoleProxy:
    """Forwards 127.0.0.1:`port` to `target_port`; `swallow()` silences every connection open now, for good.

    Connections made afterwards are forwarded as usual, so a client that gives up on a silent
    connection and reconnects gets through.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._generation = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        self._generation += 1

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            generation = self._generation
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target, generation), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, generation: int) -> None:
        """Copy bytes until either side closes; once swallowed, read and drop them, never closing."""
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    return
                if generation == self._generation:
                    target.sendall(data)
            except OSError:
                return
