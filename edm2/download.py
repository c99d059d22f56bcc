"""Download-with-cache for model files and metric weights (requests, streaming, atomic writes).

    path = edm2.download("https://example.org/model.pkl", sha256="...")   # cached under $EDM2_CACHE_DIR
    path = edm2.resolve_path_or_url(path_or_url)                          # local paths pass through

The cache folder is `$EDM2_CACHE_DIR`, else `~/.cache/edm2`. A cached file is reused when it exists (and
matches the checksum when one is given); a download is written to a temporary file in the cache folder and
renamed into place only when complete and verified, so an interrupted download never leaves a partial file
that a later run would trust.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import tempfile
import urllib.parse

import requests
import tqdm

CHUNK_BYTES = 1 << 20  # streaming chunk size
TIMEOUT_S = 60  # connect / read timeout of one request


class DownloadError(RuntimeError):
    """A download failed (network error, HTTP error, truncated transfer or checksum mismatch)."""


def default_cache_dir() -> pathlib.Path:
    """`$EDM2_CACHE_DIR` if set, else `~/.cache/edm2`."""
    env = os.environ.get("EDM2_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "edm2"


def is_url(s: str) -> bool:
    return isinstance(s, str) and s.lower().startswith(("http://", "https://"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path_for(url: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where `url` is cached: a hash of the whole URL (so equal file names from different hosts never collide)
    followed by the URL's file name, kept readable."""
    name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:]
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}_{name}"


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return sha256.lower()


def download(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Download `url` into the cache (once) and return the local path.

    With `sha256`, a cached file is verified and a fresh download must match; a mismatch raises
    DownloadError and the downloaded bytes are not kept.
    """
    if not is_url(url):
        raise ValueError(f"download: expected an http(s) URL, got {url!r}")
    sha256 = _check_sha256_arg(sha256)
    dest = cache_path_for(url, cache_dir)
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        digest = _stream_to(url, tmp_name, progress)
        if sha256 is not None and digest != sha256:
            raise DownloadError(f"download {url}: SHA-256 mismatch: expected {sha256}, got {digest}; file not kept")
        os.replace(tmp_name, dest)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return dest


def _stream_to(url: str, dest: str, progress: bool) -> str:
    """Stream `url` into the file `dest` (fsynced); returns the hex SHA-256 of the bytes received."""
    h = hashlib.sha256()
    with open(dest, "wb") as f:
        try:
            response = requests.get(url, stream=True, timeout=TIMEOUT_S)
        except requests.RequestException as e:
            raise DownloadError(f"download {url}: {type(e).__name__}: {e}") from e
        with response:
            if response.status_code != 200:
                raise DownloadError(f"download {url}: HTTP {response.status_code} {response.reason}")
            total = int(response.headers.get("Content-Length", 0)) or None
            if response.headers.get("Content-Encoding", "identity") != "identity":
                total = None  # requests decodes compressed transfers; the length counts the compressed bytes
            received = 0
            name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
            bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress)
            with bar:
                try:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        f.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                except requests.RequestException as e:
                    raise DownloadError(f"download {url}: {type(e).__name__} after {received} bytes: {e}") from e
            # requests does not check the length itself; a cut connection would otherwise look complete.
            if total is not None and received != total:
                raise DownloadError(f"download {url}: truncated transfer: got {received} of {total} bytes")
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def resolve_path_or_url(s: str | os.PathLike, sha256: str | None = None) -> pathlib.Path:
    """A local file path (checked to exist, and against `sha256` when given) or an http(s) URL (downloaded)."""
    if is_url(str(s)):
        return download(str(s), sha256=sha256)
    path = pathlib.Path(s).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(s)!r} (expected a local file path or an http(s) URL)")
    sha256 = _check_sha256_arg(sha256)
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path}: SHA-256 mismatch: expected {sha256}, got {file_sha256(path)}")
    return path
