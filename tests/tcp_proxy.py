"""A small threaded TCP proxy for tests that need a network outage on demand.

    with TcpProxy("127.0.0.1", 9000) as proxy:
        client = make_client(proxy.endpoint)   # "http://127.0.0.1:PORT"
        proxy.down()   # open connections are cut, new ones are closed as soon as they arrive
        proxy.up()     # connections are forwarded again

One thread accepts; one thread per connection copies bytes both ways. Nothing waits on timers: the
threads block in select() and are woken by closing/shutting down sockets or a wake-up socket pair.
"""

from __future__ import annotations

import selectors
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._down = False
        self._closed = False
        self._sockets: set[socket.socket] = set()  # every open client and upstream socket
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections closed because the proxy was down
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """From now on: cut every open connection and close each new one at once."""
        with self._lock:
            self._down = True
            sockets = list(self._sockets)
        for sock in sockets:
            _cut(sock)

    def up(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._down = False

    def close(self) -> None:
        """Stop accepting, cut every connection and wait for the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=10)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _cut(sock)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- threads -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                with self._lock:
                    refuse = self._down or self._closed
                    if refuse:
                        self.refused += 1
                    else:
                        self.accepted += 1
                        self._sockets.add(client)
                        thread = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                                  name=f"tcp-proxy-{self.port}-conn")
                        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                if refuse:
                    _cut(client)
                    client.close()
                else:
                    thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                return
            with self._lock:
                if self._down or self._closed:
                    return
                self._sockets.add(upstream)
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._sockets.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
            for sock in (client, upstream):
                if sock is not None:
                    sock.close()

    @staticmethod
    def _pump(client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until both directions are finished (or a socket fails)."""
        other = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            open_directions = 2
            while open_directions:
                for key, _ in selector.select():
                    source = key.fileobj
                    try:
                        chunk = source.recv(65536)
                        if chunk:
                            other[source].sendall(chunk)
                            continue
                        # End of stream from one side: pass the half-close on, keep the other direction.
                        selector.unregister(source)
                        open_directions -= 1
                        other[source].shutdown(socket.SHUT_WR)
                    except OSError:
                        return


def _cut(sock: socket.socket) -> None:
    """End a connection now: wakes a thread blocked on it, and the peer sees the connection closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
