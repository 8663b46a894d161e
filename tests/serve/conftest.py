"""Fixtures for the server tests: a tiny lmmkit checkpoint, its model, and real servers on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serve_helpers import MODEL_NAME, LiveServer

from lmmkit.config import config_from_dict, config_to_dict
from lmmkit.models.build import build_vlm
from lmmkit.serve import ServeLimits
from lmmkit.train.checkpoint import load_model, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An lmmkit checkpoint from the shipped parts (untrained bridge: the server is under test, not the answers)."""
    out = tmp_path_factory.mktemp("serve-ckpt") / "checkpoint-0"
    model = build_vlm("shipped:lm", "shipped:vision")
    cfg = config_to_dict(config_from_dict({"model": {"llm": "shipped:lm", "vision": "shipped:vision"},
                                           "train": {"stage": "align", "output_dir": str(out.parent)}}, source="test"))
    save_checkpoint(out, model, ("bridge",), cfg, {"step": 0})
    return out


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
