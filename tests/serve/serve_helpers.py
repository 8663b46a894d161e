"""Helpers for the server tests: a uvicorn server in a thread, images as data URLs, and a minimal
Chrome DevTools Protocol client over --remote-debugging-pipe (no websocket library needed)."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import zlib

from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
MODEL_NAME = "tiny-lmmkit"


class LiveServer:
    """uvicorn serving `app` on a free localhost port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def batcher(self):
        return self.app.state.batcher

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()


def picture(color: str = "red", shape: str = "circle", size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    box = (size // 6, size // 6, size * 5 // 6, size * 5 // 6)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes | Image.Image, mime: str = "image/png") -> str:
    raw = png_bytes(data) if isinstance(data, Image.Image) else data
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 1x1 PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    raw = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(raw[ihdr:ihdr + 17])).to_bytes(4, "big")
    return bytes(raw)


def user_message(question: str, *images: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


class Chrome:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out, NUL-framed JSON)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=900,800"]

    def __init__(self, binary: str = CHROMIUM) -> None:
        self.profile = tempfile.mkdtemp(prefix="lmmkit-chrome-")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # Chromium wants the pipe on fds 3 and 4: move ours above 9 first (so they cannot collide), then let
        # bash map them (dash cannot redirect fds above 9).
        a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(res_w)
        script = f'exec "$0" "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, binary, *self.FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], pass_fds=(a, b), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30, page: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buf += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 page=False)["sessionId"]
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{expression} stayed falsy for {timeout} s; page: {self.js('document.body.innerText')}")

    def set_files(self, selector: str, paths: list[str]) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": paths})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", page=False, timeout=5)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._res_r)
        shutil.rmtree(self.profile, ignore_errors=True)


def wait_until_healthy(proc, port: int, timeout: float = 120) -> None:
    """Block until a `lmmkit serve` subprocess answers /health on `port`; fail with its output if it exits or
    the timeout passes first."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.2)
