"""One web-app server per test module: the tiny preset on a free 127.0.0.1 port, always shut down."""

import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.jpg"
START_TIMEOUT_S = 30


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, timeout: float = START_TIMEOUT_S) -> None:
    """Return once ``url`` answers, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the web app did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def server():
    """(url, demo) of the app on the tiny SD1.5 preset, served from a thread of this process."""
    from omniportrait.pipelines.loading import load_pipeline
    from omniportrait.web.app import build_demo, launch

    pipe = load_pipeline("tiny-sd15", None, None, None, "cpu", "auto", "ddim")
    demo = build_demo(pipe, preset="tiny-sd15", device="cpu")
    port = free_port()
    launch(demo, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url)
        yield url, demo
    finally:
        demo.close()
        demo.omniportrait_sessions.close()
