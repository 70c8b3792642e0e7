"""Decoding video (mp4, webm/mkv, mov, avi, animated GIF) with PyAV into a few evenly spaced RGB frames.

Resolution is checked from the stream header before any frame is decoded; duration and the number of
frames decoded are counted as frames arrive, so a file whose header lies stops at the cap. Memory is
bounded whatever the length: decoded frames are kept at a stride that doubles whenever more than
2 x num_frames are held, then num_frames are picked evenly from what is left (vLLM samples
`num_frames` evenly over the clip in the same way, from the header's frame count).
"""
import io
from dataclasses import dataclass

import av
import numpy as np

from hark.media.errors import MediaDecodeError, MediaError, MediaTooLargeError


@dataclass
class VideoLimits:
    max_input_bytes: int = 100 * 2**20
    max_duration_s: float = 600.0
    max_decoded_frames: int = 36_000        # frames decoded (then dropped or kept) in all
    max_side: int = 4096
    max_frame_pixels: int = 3840 * 2160


@dataclass
class VideoFrames:
    frames: np.ndarray          # [T, H, W, 3] uint8, RGB
    timestamps: list[float]     # seconds from the start, one per frame
    duration: float             # seconds of video decoded


def decode_video(data: bytes, num_frames: int = 32, limits: VideoLimits | None = None) -> VideoFrames:
    """Up to `num_frames` evenly spaced RGB frames of the first video stream in `data`."""
    limits = limits or VideoLimits()
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if len(data) > limits.max_input_bytes:
        raise MediaTooLargeError(f"video input is {len(data)} bytes, over the limit of "
                                 f"{limits.max_input_bytes / 2**20:.0f} MiB")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError):
        raise MediaDecodeError("the data is not a video in a supported format "
                               "(mp4, webm, mkv, mov, avi, gif)") from None
    with container:
        if not container.streams.video:
            raise MediaError("the file holds no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if max(width, height) > limits.max_side or width * height > limits.max_frame_pixels:
            raise MediaError(f"video is {width} x {height} pixels, over the limit of "
                                     f"{limits.max_side} per side and {limits.max_frame_pixels} per frame")
        kept, stride, seen, last_t = [], 1, 0, 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else seen / float(stream.average_rate or 25)
                seen += 1
                if seen > limits.max_decoded_frames or t > limits.max_duration_s:
                    raise MediaError(
                        f"video is longer than the limit of {limits.max_duration_s:g} s or "
                        f"{limits.max_decoded_frames} frames; send a shorter clip")
                if frame.width != width or frame.height != height:
                    raise MediaError("video frames change size mid-stream; re-encode it at one resolution")
                last_t = t
                if (seen - 1) % stride:
                    continue
                kept.append((t, frame.to_ndarray(format="rgb24")))
                if len(kept) > 2 * num_frames:
                    kept, stride = kept[::2], stride * 2
        except av.error.FFmpegError:
            raise MediaDecodeError("the video data is truncated or corrupt; send the complete file") from None
    if not kept:
        raise MediaDecodeError("the video has no decodable frames")
    pick = np.unique(np.linspace(0, len(kept) - 1, min(num_frames, len(kept))).round().astype(int))
    return VideoFrames(np.stack([kept[i][1] for i in pick]), [kept[i][0] for i in pick], last_t)
