"""Download-with-cache against a local HTTP server started inside the test (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest
import torch

from conftest import build_reference_net
from edm2.download import DownloadError, cache_path_for, download, resolve_path_or_url
from edm2.model_files import load_network, save_network


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests_seen: list[str] = []
    truncate: set[str] = set()  # paths served with a Content-Length larger than the body

    def do_GET(self):
        type(self).requests_seen.append(self.path)
        name = self.path.lstrip("/")
        if name in self.truncate:
            body = (self.server.root / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 100))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        super().do_GET()

    def translate_path(self, path):
        return str(self.server.root / path.lstrip("/").split("?")[0])

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    _Handler.requests_seen = []
    _Handler.truncate = set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = root
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_caches_and_verifies(server, tmp_path, monkeypatch):
    root, base = server
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several streaming chunks
    (root / "weights.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDM2_CACHE_DIR", str(cache))

    path = download(f"{base}/weights.bin", sha256=digest, progress=False)
    assert path.read_bytes() == payload and path.parent == cache and path.name.endswith("_weights.bin")
    again = download(f"{base}/weights.bin", sha256=digest, progress=False)
    assert again == path and _Handler.requests_seen == ["/weights.bin"]  # served from the cache
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary files left

    # A cached file that no longer matches the checksum is fetched again.
    path.write_bytes(b"damaged")
    assert download(f"{base}/weights.bin", sha256=digest, progress=False).read_bytes() == payload
    assert len(_Handler.requests_seen) == 2


def test_download_errors_keep_nothing(server, tmp_path):
    root, base = server
    (root / "a.bin").write_bytes(b"hello")
    (root / "cut.bin").write_bytes(b"x" * 1000)
    _Handler.truncate.add("cut.bin")
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download(f"{base}/a.bin", cache_dir=cache, sha256="0" * 64, progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{base}/missing.bin", cache_dir=cache, progress=False)
    with pytest.raises(DownloadError, match="(truncated|ChunkedEncodingError|IncompleteRead|ProtocolError)"):
        download(f"{base}/cut.bin", cache_dir=cache, progress=False)
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download(f"{base}/a.bin", cache_dir=cache, sha256="abc")
    with pytest.raises(ValueError, match="http"):
        download("ftp://example.org/a.bin", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_path_or_url(tmp_path / "nothing.here")
    assert cache_path_for("http://a/x/model.pkl", cache) != cache_path_for("http://b/x/model.pkl", cache)


def test_load_network_from_url(server, ref, tmp_path, monkeypatch):
    root, base = server
    net = build_reference_net(ref)
    save_network(root / "model.safetensors", net, ema_std=0.1)
    monkeypatch.setenv("EDM2_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_network(f"{base}/model.safetensors")
    assert loaded.ema_std == 0.1 and str(loaded.path).startswith(str(tmp_path / "cache"))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.net.state_dict().items())
