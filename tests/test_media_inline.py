"""Media without the network: base64 audio (input_audio), data: URLs and file: URLs."""
import asyncio
import base64
import os

import pytest

from hark.media import (MediaError, MediaFetchError, MediaNotAllowedError, MediaPolicy, MediaTooLargeError,
                        afetch_media, decode_base64_audio, fetch_media)

AUDIO = b"RIFF" + bytes(range(256)) * 4
ENCODED = base64.b64encode(AUDIO).decode()


@pytest.fixture(params=["sync", "async"])
def fetch(request):
    if request.param == "sync":
        return fetch_media
    return lambda url, policy: asyncio.run(afetch_media(url, policy))


def test_base64_audio_is_decoded():
    assert decode_base64_audio(ENCODED, max_bytes=len(AUDIO)) == AUDIO


@pytest.mark.parametrize("data", ["not base64!", "QUJD\nREVG", "QUJ", "data:audio/wav;base64," + ENCODED])
def test_invalid_base64_is_a_clear_error(data):
    with pytest.raises(MediaError, match="not valid base64"):
        decode_base64_audio(data, max_bytes=10_000)


def test_oversize_base64_is_refused_before_decoding():
    with pytest.raises(MediaTooLargeError, match="over the limit of 1000"):
        decode_base64_audio(ENCODED, max_bytes=1000)
    # Sized from the text alone: even text that is not base64 is refused as too large, not as invalid.
    with pytest.raises(MediaTooLargeError):
        decode_base64_audio("!" * 1400, max_bytes=1000)


def test_data_url_is_decoded(fetch):
    assert fetch("data:audio/wav;base64," + ENCODED, MediaPolicy()) == AUDIO
    assert fetch("DATA:;BASE64," + ENCODED, MediaPolicy()) == AUDIO


@pytest.mark.parametrize("url", ["data:audio/wav," + ENCODED, "data:audio/wav;base64", "data:text/plain,hello"])
def test_data_url_must_be_base64(fetch, url):
    with pytest.raises(MediaError, match="must be base64"):
        fetch(url, MediaPolicy())


def test_data_url_with_invalid_base64_is_a_media_error(fetch):
    with pytest.raises(MediaError, match="not valid base64"):
        fetch("data:audio/wav;base64,@@@@", MediaPolicy())


def test_oversize_data_url_is_refused(fetch):
    with pytest.raises(MediaTooLargeError):
        fetch("data:audio/wav;base64," + ENCODED, MediaPolicy(max_bytes=len(AUDIO) - 1))


@pytest.fixture
def media_root(tmp_path):
    """tmp/allowed/a.wav, tmp/secret.wav outside the root, and tmp/allowed/link.wav -> tmp/secret.wav."""
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.wav").write_bytes(AUDIO)
    (tmp_path / "secret.wav").write_bytes(b"secret")
    (root / "link.wav").symlink_to(tmp_path / "secret.wav")
    (root / "inner.wav").symlink_to(root / "a.wav")
    return root


def test_file_inside_the_root_is_read(fetch, media_root):
    policy = MediaPolicy(allowed_local_root=str(media_root))
    assert fetch(f"file://{media_root}/a.wav", policy) == AUDIO
    assert fetch(f"file://localhost{media_root}/a.wav", policy) == AUDIO
    assert fetch(f"file://{media_root}/inner.wav", policy) == AUDIO  # a symlink that stays inside
    assert fetch(f"file://{media_root}/sub/../a.wav", policy) == AUDIO  # ".." that stays inside


def test_root_given_through_a_symlink_works(fetch, media_root, tmp_path):
    (tmp_path / "root-link").symlink_to(media_root)
    policy = MediaPolicy(allowed_local_root=str(tmp_path / "root-link"))
    assert fetch(f"file://{media_root}/a.wav", policy) == AUDIO


@pytest.mark.parametrize("path", ["{root}/../secret.wav", "{root}/%2e%2e/secret.wav", "{root}/link.wav",
                                  "{root}_sibling/a.wav", "/etc/passwd", "{root}/../allowed_sibling/a.wav"])
def test_file_outside_the_root_is_refused(fetch, media_root, path):
    (media_root.parent / "allowed_sibling").mkdir()
    (media_root.parent / "allowed_sibling" / "a.wav").write_bytes(AUDIO)
    policy = MediaPolicy(allowed_local_root=str(media_root))
    with pytest.raises(MediaNotAllowedError, match="--allowed-local-media-path"):
        fetch("file://" + path.format(root=media_root), policy)


def test_file_urls_are_refused_without_a_root(fetch, media_root):
    with pytest.raises(MediaNotAllowedError, match="--allowed-local-media-path"):
        fetch(f"file://{media_root}/a.wav", MediaPolicy())


def test_file_on_a_remote_host_is_refused(fetch, media_root):
    with pytest.raises(MediaNotAllowedError, match="remote host"):
        fetch(f"file://fileserver{media_root}/a.wav", MediaPolicy(allowed_local_root=str(media_root)))


def test_oversize_file_is_refused(fetch, media_root):
    with pytest.raises(MediaTooLargeError, match=f"{len(AUDIO)} bytes"):
        fetch(f"file://{media_root}/a.wav", MediaPolicy(allowed_local_root=str(media_root), max_bytes=100))


def test_missing_file_and_folder_are_errors(fetch, media_root):
    policy = MediaPolicy(allowed_local_root=str(media_root))
    with pytest.raises(MediaFetchError, match="does not exist"):
        fetch(f"file://{media_root}/missing.wav", policy)
    os.mkfifo(media_root / "pipe.wav")  # would block a reader forever
    for name in ["", "pipe.wav"]:
        with pytest.raises(MediaError, match="not a regular file"):
            fetch(f"file://{media_root}/{name}", policy)


def test_policy_root_must_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        MediaPolicy(allowed_local_root=str(tmp_path / "missing"))
