"""Nightshift's blue/green switch: a TCP proxy on a stable port (stdlib only).

Runs in a container from the inference base image (`python3 tcp_proxy.py`),
on the host network, bound to LISTEN_HOST:LISTEN_PORT. Every *new* connection
is forwarded to the upstream named in UPSTREAM_FILE (``host:port``), read at
connect time, so the deploy step switches traffic by atomically replacing that
file: connections already open finish on the old backend (which drains on
SIGTERM), new ones go to the new backend. No request is parsed or buffered.

With GRPC_LISTEN_PORT set, a second listener forwards to the upstream named in
GRPC_UPSTREAM_FILE the same way (the server's OIP gRPC port: HTTP/2 is just
bytes to a TCP proxy, and a gRPC channel's connection stays on the backend it
opened to, as a keep-alive HTTP connection does).
"""

import asyncio
import os
import signal
import sys

LISTEN_HOST = os.environ.get("LISTEN_HOST", "127.0.0.1")
LISTEN_PORT = int(os.environ.get("LISTEN_PORT", "8600"))
UPSTREAM_FILE = os.environ.get("UPSTREAM_FILE", "/etc/nightshift-proxy/upstream")
GRPC_LISTEN_PORT = int(os.environ.get("GRPC_LISTEN_PORT") or 0)
GRPC_UPSTREAM_FILE = os.environ.get("GRPC_UPSTREAM_FILE", "/etc/nightshift-proxy/upstream-grpc")


def upstream(path=UPSTREAM_FILE):
    with open(path, encoding="utf-8") as f:
        host, _, port = f.read().strip().rpartition(":")
    return host or "127.0.0.1", int(port)


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def handle(client_reader, client_writer, path=UPSTREAM_FILE):
    try:
        host, port = upstream(path)
        up_reader, up_writer = await asyncio.open_connection(host, port)
    except Exception as exc:  # noqa: BLE001 - no backend: close, and say so once per connection
        print(f"tcp_proxy: no upstream ({exc})", file=sys.stderr, flush=True)
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))


async def main():
    servers = [await asyncio.start_server(handle, LISTEN_HOST, LISTEN_PORT, reuse_address=True)]
    if GRPC_LISTEN_PORT:
        async def handle_grpc(reader, writer):
            await handle(reader, writer, GRPC_UPSTREAM_FILE)

        servers.append(await asyncio.start_server(handle_grpc, LISTEN_HOST, GRPC_LISTEN_PORT, reuse_address=True))
        print(f"tcp_proxy: {LISTEN_HOST}:{GRPC_LISTEN_PORT} -> {GRPC_UPSTREAM_FILE}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tcp_proxy: {LISTEN_HOST}:{LISTEN_PORT} -> {UPSTREAM_FILE}", file=sys.stderr, flush=True)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
