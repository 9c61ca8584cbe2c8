"""A small threaded TCP proxy for tests that need a network outage on demand.

    with TcpProxy("127.0.0.1", 9000) as proxy:
        client = make_client(proxy.endpoint)   # "http://127.0.0.1:PORT"
        proxy.down()       # open connections are cut, new ones are closed as soon as they arrive
        proxy.black_hole() # open connections go silent, new ones are accepted and never answered
        proxy.trickle(0.05)  # answers come 64 bytes at a time, 0.05 s apart
        proxy.up()         # connections are forwarded again (silent ones are cut: the client sees a reset)

A black hole is what a dead route or a firewall that drops packets looks like to a client: the
connection opens (or stays open) and no byte ever comes back, so only the client's own timeouts end
its wait. A trickle is a server that answers too slowly to finish but fast enough that no read times
out. One thread accepts; one thread per connection copies bytes both ways. Only a trickle waits on a
timer: otherwise the threads block in select() and are woken by closing/shutting down sockets or a
wake-up socket pair.
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
        self._silent = False  # black-holed: hold client connections open and never answer them
        self._trickle_s = 0.0  # > 0: the pause between the 64-byte pieces of an answer
        self._full_speed = threading.Event()  # set: a trickle's pause ends now (up(), close())
        self._closed = False
        self._sockets: set[socket.socket] = set()  # every open client and upstream socket
        self._held: set[socket.socket] = set()  # client connections held silent by the black hole
        self._clients: set[socket.socket] = set()  # the client side of each forwarded connection
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections closed because the proxy was down
        self.swallowed = 0  # connections accepted by the black hole (new ones and silenced open ones)
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

    def black_hole(self) -> None:
        """From now on: accept every new connection and never answer it; open connections go silent
        (their upstream side is cut, their client side stays open and hears nothing)."""
        with self._lock:
            self._silent = True
            upstreams = [sock for sock in self._sockets if sock not in self._clients]
        for sock in upstreams:
            _cut(sock)

    def trickle(self, pause_s: float) -> None:
        """From now on: forward answers 64 bytes at a time, ``pause_s`` apart (each read a client makes gets
        bytes within its timeout, but a large answer takes very long)."""
        with self._lock:
            self._trickle_s = pause_s
            self._full_speed.clear()

    def up(self) -> None:
        """Forward new connections again at full speed; connections held by a black hole are cut (as a long
        outage ends them)."""
        with self._lock:
            self._down = self._silent = False
            self._trickle_s = 0.0
            self._full_speed.set()
            held, self._held = list(self._held), set()
        for sock in held:
            _cut(sock)
            sock.close()

    def close(self) -> None:
        """Stop accepting, cut every connection and wait for the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._full_speed.set()
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=10)
        with self._lock:
            sockets = list(self._sockets)
            held, self._held = list(self._held), set()
        for sock in sockets + held:
            _cut(sock)
        for sock in held:
            sock.close()
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
                    elif self._silent:
                        self.swallowed += 1
                        self._held.add(client)
                        continue
                    else:
                        self.accepted += 1
                        self._sockets.add(client)
                        self._clients.add(client)
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
        held = False
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                return
            with self._lock:
                if self._down or self._closed or self._silent:
                    return
                self._sockets.add(upstream)
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._sockets.discard(client)
                self._clients.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
                # A black hole keeps the client side open and silent rather than closing it.
                held = self._silent and not self._closed
                if held:
                    self.swallowed += 1
                    self._held.add(client)
            for sock in (upstream,) if held else (client, upstream):
                if sock is not None:
                    sock.close()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until both directions are finished (or a socket fails, or a black hole begins)."""
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
                        if chunk and not self._silent:
                            self._send(other[source], chunk, slowly=source is upstream)
                            continue
                        if self._silent:
                            return  # black_hole() cut the upstream side: the client hears nothing more
                        # End of stream from one side: pass the half-close on, keep the other direction.
                        selector.unregister(source)
                        open_directions -= 1
                        other[source].shutdown(socket.SHUT_WR)
                    except OSError:
                        return


    def _send(self, sock: socket.socket, data: bytes, slowly: bool) -> None:
        """Send ``data`` on; an answer (``slowly``) in 64-byte pieces while a trickle lasts."""
        while data:
            pause = self._trickle_s if slowly else 0.0
            piece, data = (data[:64], data[64:]) if pause else (data, b"")
            sock.sendall(piece)
            if pause and data:
                self._full_speed.wait(pause)


def _cut(sock: socket.socket) -> None:
    """End a connection now: wakes a thread blocked on it, and the peer sees the connection closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
