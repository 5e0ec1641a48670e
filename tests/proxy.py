"""A TCP proxy a test can switch between forwarding, refusing and black-holing connections.

``blackhole``: connections are accepted and then nothing moves (a database behind a dead
network path: a client waits for its connect timeout). ``refuse``: accepted and closed at
once. ``forward``: bytes flow both ways. A switch applies to new connections; ``cut()``
also closes the ones already open.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class Proxy:
    """Listens on a loopback TCP port; forwards to ``target``: ``(host, port)``, or the path
    of a Unix socket (an embedded Postgres listens on one)."""

    def __init__(self, target: tuple[str, int] | str, *, mode: str = "forward") -> None:
        self.target = target
        self.mode = mode
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_database(cls, database_url: str, *, mode: str = "forward") -> Proxy:
        """A proxy in front of the Postgres of ``database_url`` (TCP or socket folder)."""
        from sqlalchemy.engine import make_url

        url = make_url(database_url)
        folder = url.query.get("host")
        if isinstance(folder, str) and folder.startswith("/"):
            return cls(f"{folder}/.s.PGSQL.{url.port or 5432}", mode=mode)
        return cls((url.host or "127.0.0.1", url.port or 5432), mode=mode)

    def url_for(self, database_url: str) -> str:
        """``database_url`` (an SQLAlchemy URL) pointed at this proxy."""
        from sqlalchemy.engine import make_url

        url = make_url(database_url).difference_update_query(["host"])
        return url.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            mode = self.mode
            if mode == "refuse":
                client.close()
                continue
            with self._lock:
                self._open.append(client)
            if mode == "forward":
                threading.Thread(target=self._pipe, args=(client,), daemon=True).start()
            # blackhole: keep the socket open, move nothing

    def _pipe(self, client: socket.socket) -> None:
        try:
            if isinstance(self.target, str):
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.settimeout(5)
                upstream.connect(self.target)
                upstream.settimeout(None)
            else:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.append(upstream)
        pairs = {client: upstream, upstream: client}
        selector = selectors.DefaultSelector()
        for sock in pairs:
            selector.register(sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except OSError:
                        return
                    if not data:
                        return
                    pairs[key.fileobj].sendall(data)  # type: ignore[index]
        except OSError:
            return
        finally:
            selector.close()
            for sock in pairs:
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Close every open connection (the ones to come follow ``mode``)."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        with contextlib.suppress(OSError):
            self._server.close()
        self._thread.join(2)
