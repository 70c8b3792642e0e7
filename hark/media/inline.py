"""Media that needs no network: base64 audio, data: URLs, and files under an allowed folder."""
import base64
import binascii
import os
import stat
from urllib.parse import unquote, urlsplit

from hark.media.errors import MediaError, MediaFetchError, MediaNotAllowedError, MediaTooLargeError
from hark.media.policy import MediaPolicy


def decode_base64_audio(data: str, max_bytes: int) -> bytes:
    """Decode standard base64 (the `input_audio` content part), refusing oversize input before
    decoding it."""
    decoded_size = len(data.rstrip("=")) * 3 // 4
    if decoded_size > max_bytes:
        raise MediaTooLargeError(
            f"base64 audio decodes to about {decoded_size} bytes, over the limit of {max_bytes}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        hint = " (give the base64 text alone, without a 'data:' prefix)" if data.startswith("data:") else ""
        raise MediaError(f"audio data is not valid base64{hint}") from None


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Decode `data:<mime type>;base64,<data>`; only base64 data URLs are accepted."""
    header, comma, data = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaError("a data: media URL must be base64 encoded: data:audio/wav;base64,<data>")
    return decode_base64_audio(data, max_bytes)


def read_local_file(url: str, policy: MediaPolicy) -> bytes:
    """Read a file: URL whose real path (symlinks resolved) lies inside policy.allowed_local_root."""
    if policy.allowed_local_root is None:
        raise MediaNotAllowedError(
            "file: media URLs are disabled; allow a folder with --allowed-local-media-path")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaNotAllowedError(f"file: media URL {url!r} names a remote host; only local files are read")
    shown = unquote(parts.path)
    if "\0" in shown:
        raise MediaError("file: media URL holds a NUL character")
    root = os.path.realpath(policy.allowed_local_root)
    path = os.path.realpath(shown)
    if os.path.commonpath([root, path]) != root:
        raise MediaNotAllowedError(
            f"media file {shown!r} is outside the folder allowed by --allowed-local-media-path")
    try:
        info = os.stat(path)
    except OSError:
        raise MediaFetchError(f"media file {shown!r} does not exist or cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"media path {shown!r} is not a regular file")
    if info.st_size > policy.max_bytes:
        raise MediaTooLargeError(f"media file is {info.st_size} bytes, over the limit of {policy.max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)  # the file may have grown since stat
    except OSError:
        raise MediaFetchError(f"media file {shown!r} cannot be read") from None
    if len(data) > policy.max_bytes:
        raise MediaTooLargeError(f"media file is over the limit of {policy.max_bytes} bytes")
    return data
