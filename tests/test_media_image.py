"""Images and video decoded with caps checked before pixels exist: a real photo, hostile files, EXIF, alpha."""
import io
import struct
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from hark.media.errors import MediaDecodeError, MediaError, MediaTooLargeError
from hark.media.image import ImageLimits, decode_image
from hark.media.video import VideoLimits, decode_video

PHOTO = Path(__file__).parent / "data" / "hubble_deep_field.jpg"   # scikit-image's data, BSD


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(side: int = 30000) -> bytes:
    """A valid PNG header claiming side x side 1-bit pixels, with a few KB of (all-zero) rows after it."""
    rows = zlib.compress(b"\0" * (1 + side // 8) * 64, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def gif_frames(n_pairs: int) -> bytes:
    """An animated 2 x 2 GIF of 3 + 2 * n_pairs frames, built by repeating Pillow's bytes for a frame pair."""
    def frames(n):
        images = [Image.new("P", (2, 2), i % 2) for i in range(n)]
        for im in images:
            im.putpalette([0, 0, 0, 255, 255, 255])
        return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)
    three, five = frames(3), frames(5)
    pair = five[len(three) - 1: len(five) - 1]
    return three[:-1] + pair * n_pairs + b";"


def test_real_photo_decodes_as_pillow_does():
    data = PHOTO.read_bytes()
    image = decode_image(data)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.mode == "RGB" and image.size == reference.size
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_decompression_bomb_refused_from_its_header():
    data = huge_png()
    assert len(data) < 20_000
    start = time.perf_counter()
    with pytest.raises(MediaError, match="pixels"):
        decode_image(data)                                        # over Pillow's own cap too
    with pytest.raises(MediaError, match="7000 x 7000"):
        decode_image(huge_png(7000))                              # under Pillow's, over ours
    assert time.perf_counter() - start < 1.0


def test_truncated_and_foreign_data_refused():
    data = PHOTO.read_bytes()
    with pytest.raises(MediaDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(MediaDecodeError, match="not an image"):
        decode_image(b"%PDF-1.4 not a picture at all")
    with pytest.raises(MediaTooLargeError, match="MiB"):
        decode_image(data, ImageLimits(max_input_bytes=1000))


def test_tiny_and_thin_images_refused():
    with pytest.raises(MediaError, match="1 x 1 pixels"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"))
    with pytest.raises(MediaError, match="aspect ratio"):
        decode_image(encode(Image.new("RGB", (4000, 4)), "PNG"))


def test_animated_gif_with_100k_frames_refused_quickly():
    data = gif_frames(50_000)
    assert len(data) < 5 * 2**20
    start = time.perf_counter()
    with pytest.raises(MediaError, match="animated"):
        decode_image(data)
    with pytest.raises(MediaError, match="frames"):
        decode_video(data, limits=VideoLimits(max_decoded_frames=1000))
    assert time.perf_counter() - start < 5.0


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90° clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_composited_on_background(mode):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))               # fully transparent red
    image.putpixel((0, 0), (255, 0, 0, 255))                          # one opaque red pixel
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((1, 1))
    decoded = np.asarray(decode_image(encode(image, "PNG"), background=(0, 0, 255)))
    assert tuple(decoded[1, 1]) == (0, 0, 255)
    expected = (76, 76, 76) if mode == "LA" else (255, 0, 0)          # LA holds red as its grey
    assert tuple(decoded[0, 0]) == pytest.approx(expected, abs=2)


def make_video(seconds: float, fps: int = 10, size=(64, 48)) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(int(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), i * 4, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def test_video_frames_evenly_spaced():
    video = decode_video(make_video(6.0), num_frames=8)
    assert video.frames.shape == (8, 48, 64, 3) and video.frames.dtype == np.uint8
    steps = np.diff(video.timestamps)
    assert video.timestamps[0] == 0.0 and video.duration == pytest.approx(5.9, abs=0.01)
    assert steps.min() > 0.5 and steps.max() < 1.1                  # ~6 s / 8 frames, strided
    brightness = video.frames.mean(axis=(1, 2, 3))
    assert np.all(np.diff(brightness) > 0)                           # in time order


def test_video_caps():
    with pytest.raises(MediaError, match="longer than"):
        decode_video(make_video(3.0), limits=VideoLimits(max_duration_s=1.0))
    with pytest.raises(MediaError, match="64 x 48"):
        decode_video(make_video(0.5), limits=VideoLimits(max_side=32))
    with pytest.raises(MediaDecodeError, match="not a video"):
        decode_video(b"definitely not a video file")
    with pytest.raises(MediaDecodeError):
        data = make_video(2.0)
        decode_video(data[: len(data) // 3])
