"""Decoding images (PNG, JPEG, WebP, GIF, BMP, TIFF) with Pillow, with caps checked before pixels exist.
Caps on pixels are request errors (MediaError, HTTP 400); only byte caps are MediaTooLargeError (413).

Pillow reads the header first: size, pixel count and animation are checked there, so a few-KB PNG that
claims 30000 x 30000 pixels is refused before a byte of its pixels is decoded. Only the formats listed
are tried (no EPS/PDF/SVG through Pillow's plugins). Truncated data is an error, not a half-grey
picture. EXIF orientation is applied, and transparency is composited onto a background colour, as
vLLM does for RGBA input (white unless the caller says otherwise).
"""
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from hark.media.errors import MediaDecodeError, MediaError, MediaTooLargeError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class ImageLimits:
    max_input_bytes: int = 20 * 2**20   # the encoded file, as OpenAI's image inputs allow
    max_pixels: int = 40_000_000        # width x height, about 6300 x 6300
    max_side: int = 16_384
    min_side: int = 2                   # a 1 x 1 "image" carries nothing a vision tower can see
    max_aspect_ratio: float = 200.0     # Qwen2-VL's processor refuses wider ones too


def check_image_size(width: int, height: int, limits: ImageLimits) -> None:
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise MediaError(
            f"image is {width} x {height} pixels, over the limit of {limits.max_pixels} pixels "
            f"({limits.max_side} per side); send a smaller image")
    if min(width, height) < limits.min_side:
        raise MediaError(f"image is {width} x {height} pixels; at least {limits.min_side} per side is needed")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise MediaError(f"image is {width} x {height} pixels: its aspect ratio is over "
                         f"{limits.max_aspect_ratio:g}; crop or pad it")


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image's header, opened lazily and checked; no pixels decoded yet."""
    if len(data) > limits.max_input_bytes:
        raise MediaTooLargeError(f"image input is {len(data)} bytes, over the limit of "
                                 f"{limits.max_input_bytes / 2**20:.1f} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):   # Pillow's own cap, ~89 M pixels
        raise MediaError(f"image claims more pixels than the limit of {limits.max_pixels}; "
                                 "send a smaller image") from None
    except UnidentifiedImageError:
        raise MediaDecodeError(f"the data is not an image in a supported format "
                               f"({', '.join(f.lower() for f in FORMATS)})") from None
    except (OSError, SyntaxError, ValueError):
        raise MediaDecodeError("the image header is corrupt; send the complete file") from None
    check_image_size(*image.size, limits)
    if getattr(image, "is_animated", False):
        raise MediaError("animated images are not accepted as an image; send one frame, or the clip as a video")
    return image


def decode_image(data: bytes, limits: ImageLimits | None = None,
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB PIL image from encoded bytes, checked against `limits` before its pixels are decoded."""
    limits = limits or ImageLimits()
    image = open_image(data, limits)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise MediaDecodeError("the image data is truncated or corrupt; send the complete file") from None
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB, with any transparency (RGBA, LA, palette with a transparent index) composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, background)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")
