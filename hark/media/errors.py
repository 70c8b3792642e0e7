"""Errors a media reference can cause. All are ValueErrors: the request, not hark, is at fault."""


class MediaError(ValueError):
    """A media URL or inline audio that cannot be used."""


class MediaNotAllowedError(MediaError):
    """The media policy refuses the URL: its scheme, host, address or local path."""


class MediaTooLargeError(MediaError):
    """The media is larger than the policy's byte cap."""


class MediaFetchError(MediaError):
    """Fetching the media failed: upstream error status, timeout, unreachable host, missing file."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code  # the upstream's HTTP status, when it answered with an error


class MediaDecodeError(MediaError):
    """The data is not an image or video in a supported format, or it is corrupt or truncated."""
