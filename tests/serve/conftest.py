"""Fixtures for the server tests: a tiny lmmkit checkpoint, its model, and real servers on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serve_helpers import MODEL_NAME, LiveServer

from lmmkit.serve import ServeLimits
from lmmkit.train.checkpoint import load_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def checkpoint(shipped_checkpoint) -> Path:
    return shipped_checkpoint


@pytest.fixture(scope="session")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="session")
def serve(model) -> Iterator[Callable[..., LiveServer]]:
    """serve(api_key=None, **limits) -> a started LiveServer for `model` (stopped at the end of the session)."""
    import torch

    from lmmkit.serve.app import create_app

    started: list[LiveServer] = []

    def start(api_key: str | None = None, **limits) -> LiveServer:
        old = torch.get_num_threads()
        torch.set_num_threads(1)  # the batcher's worker takes the creating thread's setting
        try:
            app = create_app(model, MODEL_NAME, api_key=api_key, limits=ServeLimits(**limits))
        finally:
            torch.set_num_threads(old)
        server = LiveServer(app).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()
