"""Reading media references (URLs, base64) safely: see fetch.py for what is checked. Images and video
are decoded by hark.media.image and hark.media.video (they load Pillow and PyAV).

Names load on first use, so what needs only hash_audio (the transcription command line) does not
import httpx (0.05 s of start-up)."""
__all__ = ["MediaDecodeError", "MediaError", "MediaFetchError", "MediaNotAllowedError", "MediaTooLargeError",
           "MediaPolicy",
           "afetch_media", "decode_base64_audio", "fetch_media", "hash_audio"]

_MODULES = {"MediaDecodeError": "errors", "MediaError": "errors", "MediaFetchError": "errors", "MediaNotAllowedError": "errors",
            "MediaTooLargeError": "errors", "afetch_media": "fetch", "fetch_media": "fetch", "hash_audio": "hashing",
            "decode_base64_audio": "inline", "MediaPolicy": "policy"}


def __getattr__(name: str):
    if name in _MODULES:
        import importlib
        value = getattr(importlib.import_module(f"hark.media.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hark.media' has no attribute {name!r}")
