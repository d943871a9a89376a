"""The gateway's upstream pool against a server that closes idle keep-alive connections, as
llama-server (cpp-httplib, CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND = 5) does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from orchestrator.gateway.app import UPSTREAM_KEEPALIVE_S, upstream_client

ENGINE_KEEPALIVE_S = 5.0


def _server() -> tuple[int, list[int], threading.Event]:
    """HTTP/1.1 with keep-alive: answers each request on a connection, closes it after
    ENGINE_KEEPALIVE_S idle. Returns the port, the count of requests per connection, a stop event."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    per_conn: list[int] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        per_conn.append(0)
        me = len(per_conn) - 1
        conn.settimeout(ENGINE_KEEPALIVE_S)
        with conn:
            buf = b""
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    return            # idle too long: the server closes, as cpp-httplib does
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    per_conn[me] += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
        sock.close()

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1], per_conn, stop


def test_an_idle_upstream_connection_expires_before_the_engine_closes_it() -> None:
    assert UPSTREAM_KEEPALIVE_S < ENGINE_KEEPALIVE_S
    port, per_conn, stop = _server()

    async def run() -> None:
        async with upstream_client() as client:
            for _ in range(2):        # back to back: one connection, reused
                assert (await client.get(f"http://127.0.0.1:{port}/health")).text == "ok"
            await asyncio.sleep(UPSTREAM_KEEPALIVE_S + 0.5)
            # idle past the pool's expiry but not the server's: a new connection, never the old one
            assert (await client.get(f"http://127.0.0.1:{port}/health")).text == "ok"

    try:
        t0 = time.monotonic()
        asyncio.run(run())
        assert time.monotonic() - t0 < ENGINE_KEEPALIVE_S
        assert per_conn == [2, 1], per_conn
    finally:
        stop.set()
