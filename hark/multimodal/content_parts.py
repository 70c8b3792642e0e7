"""Chat content parts in the shapes other APIs write them, as the one shape hark reads.

hark's parts: {"type": "text", "text"}, {"type": "input_audio", "input_audio": {"data", "format"}},
{"type": "audio_url", "audio_url": {"url"}}, {"type": "audio_embeds", "audio_embeds"}, and
{"type": "audio", "audio": samples} (Python only: an array, (array, rate) or encoded bytes).
Also read:
  vLLM's short parts without a type: {"text": ...}, {"audio_url": "url"}, {"input_audio": {...}}
  transformers' (the Qwen2-Audio docs): {"type": "audio", "audio_url" | "url": "url"},
  {"type": "audio", "path": "file"}, {"type": "audio", "audio": array or "url"}
  audio_url given as a plain string instead of {"url": ...}
"""
import os

KINDS = ("text", "input_audio", "audio_url", "audio_embeds")
AUDIO_KINDS = ("input_audio", "audio_url", "audio")


def normalize_part(part):
    """The part in hark's shape; anything not recognised is returned as is (the reader names it)."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind is None:
        present = [k for k in KINDS if k in part]
        if len(present) != 1:
            return part
        kind = present[0]
        part = {**part, "type": kind}
    if kind == "audio":
        for key in ("audio_url", "url"):
            if isinstance(part.get(key), (str, dict)):
                return _audio_url({k: v for k, v in part.items() if k != key}, part[key])
        if isinstance(part.get("path"), str):
            url = "file://" + os.path.abspath(part["path"])
            return _audio_url({k: v for k, v in part.items() if k != "path"}, url)
        if isinstance(part.get("audio"), str):
            return _audio_url({k: v for k, v in part.items() if k != "audio"}, part["audio"])
        return part
    if kind == "audio_url" and isinstance(part.get("audio_url"), str):
        return _audio_url(part, part["audio_url"])
    return part


def _audio_url(part: dict, url) -> dict:
    spec = url if isinstance(url, dict) else {"url": url}
    return {**part, "type": "audio_url", "audio_url": spec}
