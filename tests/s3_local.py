"""moto's S3 server on a free loopback port, for the tests and the benchmarks (needs the test extra)."""

from __future__ import annotations

import logging
import socket
from typing import Any


def start_moto() -> tuple[Any, str]:
    """Start moto's threaded S3 server on 127.0.0.1; return it (``.stop()`` it) and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"
