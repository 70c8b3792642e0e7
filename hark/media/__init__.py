"""Reading media references (URLs, base64) safely: see fetch.py for what is checked."""
from hark.media.errors import MediaError, MediaFetchError, MediaNotAllowedError, MediaTooLargeError
from hark.media.fetch import afetch_media, fetch_media
from hark.media.hashing import hash_audio
from hark.media.inline import decode_base64_audio
from hark.media.policy import MediaPolicy

__all__ = ["MediaError", "MediaFetchError", "MediaNotAllowedError", "MediaTooLargeError", "MediaPolicy",
           "afetch_media", "decode_base64_audio", "fetch_media", "hash_audio"]
