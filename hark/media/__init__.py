"""Reading media references (URLs, base64) safely: see fetch.py for what is checked. Images and video
are decoded by hark.media.image and hark.media.video (imported on use: they load Pillow and PyAV)."""
from hark.media.errors import MediaDecodeError, MediaError, MediaFetchError, MediaNotAllowedError, MediaTooLargeError
from hark.media.fetch import afetch_media, fetch_media
from hark.media.hashing import hash_audio
from hark.media.inline import decode_base64_audio
from hark.media.policy import MediaPolicy

__all__ = ["MediaDecodeError", "MediaError", "MediaFetchError", "MediaNotAllowedError", "MediaTooLargeError",
           "MediaPolicy",
           "afetch_media", "decode_base64_audio", "fetch_media", "hash_audio"]
