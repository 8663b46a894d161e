"""Images in chat requests: data URLs decoded, remote URLs fetched only when allowed, limits enforced.

Everything here runs on bytes a stranger sent, so each check happens before the expensive step
it guards: the base64 length before decoding, the header's pixel count before decompressing, the
resolved address before connecting. Every failure is an APIError with a 4xx status and a message
that says what to change.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
import warnings

from PIL import Image, UnidentifiedImageError

from lmmkit.serve import APIError, ServeLimits

# Formats a browser or client plausibly sends. Restricting PIL matters: some of its plugins
# (EPS runs Ghostscript) are far more attack surface than an image endpoint needs.
SAFE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
MAX_REDIRECTS = 3


def image_bytes(url: object, limits: ServeLimits, param: str) -> bytes:
    """The raw bytes behind an image_url: a base64 data URL, or (if allowed) a public http(s) URL."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param} must be a non-empty string", code="invalid_image_url", param=param)
    if url.startswith("data:"):
        return decode_data_url(url, limits.max_image_bytes, param)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server: send the image inline as a "
                                "data URL (data:image/png;base64,...), or start the server with "
                                "--allow-remote-images", code="remote_images_disabled", param=param)
        return fetch_remote(url, limits.max_image_bytes, limits.remote_timeout_s, param)
    raise APIError(400, f"{param}: expected a data URL (data:image/png;base64,...) or an http(s) URL, "
                        f"got {url[:40]!r}", code="invalid_image_url", param=param)


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise APIError(400, f"{param}: a data URL must look like data:image/<type>;base64,<data>",
                       code="invalid_image_url", param=param)
    # The decoded size follows from the text's length: refuse before allocating the bytes.
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise APIError(413, f"{param}: image is about {len(payload) * 3 // 4:,} bytes, more than the limit of "
                            f"{max_bytes:,} bytes", code="image_too_large", param=param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL's payload is not valid base64", code="invalid_image_url",
                       param=param) from None
    if len(data) > max_bytes:
        raise APIError(413, f"{param}: image is {len(data):,} bytes, more than the limit of {max_bytes:,} bytes",
                       code="image_too_large", param=param)
    return data


def open_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decode to RGB, refusing decompression bombs from the header's size before decompressing."""
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; an error keeps bombs out of the logs.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=SAFE_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise APIError(400, f"{param}: image is {w}x{h} = {w * h:,} pixels, more than the limit of "
                                        f"{max_pixels:,} (decompression bomb?)", code="image_too_many_pixels",
                                   param=param)
                rgb = im.convert("RGB")
                rgb.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise APIError(400, f"{param}: image is too large to decode (decompression bomb?): {err}",
                       code="image_too_many_pixels", param=param) from None
    except UnidentifiedImageError:
        raise APIError(400, f"{param}: not a recognised image (accepted: {', '.join(SAFE_FORMATS)})",
                       code="invalid_image", param=param) from None
    except Exception as err:  # PIL plugins raise OSError, SyntaxError, ValueError, ... on bad data
        raise APIError(400, f"{param}: cannot decode the image (corrupt or truncated?): {err}",
                       code="invalid_image", param=param) from None
    return rgb


# ---- remote images ---------------------------------------------------------------------------
def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Public unicast only: never loopback, private, link-local (cloud metadata), shared or reserved."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not address_allowed(embedded):
            return False
    return ip.is_global and not ip.is_multicast


def resolve_public(host: str, port: int, param: str) -> str:
    """One address for `host`, all of whose addresses must be public; we connect to exactly that one,
    so a DNS answer that changes between the check and the connection (rebinding) cannot sneak in."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise APIError(400, f"{param}: cannot resolve host {host!r}", code="image_fetch_failed",
                       param=param) from None
    addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    bad = [str(a) for a in addrs if not address_allowed(a)]
    if bad or not addrs:
        raise APIError(400, f"{param}: host {host!r} resolves to a non-public address ({', '.join(bad) or 'none'});"
                            " internal, loopback and link-local addresses are never fetched",
                       code="image_url_forbidden", param=param)
    return str(addrs[0])


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate checked for host


def fetch_remote(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET a public http(s) URL with a size cap and an overall deadline; redirects re-checked per hop."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port < 0:
            raise APIError(400, f"{param}: not a valid http(s) URL", code="invalid_image_url", param=param)
        ip = resolve_public(parts.hostname, port, param)
        conn = (_PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP)(parts.hostname, port, ip, timeout)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "lmmkit-serve", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise APIError(400, f"{param}: fetching the image gave HTTP {resp.status}",
                               code="image_fetch_failed", param=param)
            chunks, size = [], 0
            while chunk := resp.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"{param}: remote image is more than the limit of {max_bytes:,} bytes",
                                   code="image_too_large", param=param)
                if time.monotonic() > deadline:
                    raise APIError(400, f"{param}: fetching the image took more than {timeout:g} s",
                                   code="image_fetch_failed", param=param)
                chunks.append(chunk)
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as err:
            raise APIError(400, f"{param}: cannot fetch the image: {type(err).__name__}: {err}",
                           code="image_fetch_failed", param=param) from None
        finally:
            conn.close()
    raise APIError(400, f"{param}: more than {MAX_REDIRECTS} redirects", code="image_fetch_failed", param=param)
