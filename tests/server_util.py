"""Run the OpenAI server in a thread of the test process, on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llamarun.engine import Engine
from llamarun.server import create_app, listen, make_server


@contextmanager
def running_server(engine: Engine, **app_options: Any) -> Iterator[str]:
    """Serve `engine` until the block ends; yields the base URL (http://127.0.0.1:PORT/v1)."""
    app = create_app(engine, model_id="test-model", **app_options)
    server = make_server(app)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
