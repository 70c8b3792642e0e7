"""Prompts with images for vision-language models (LLaVA, Qwen2-VL): the shared part.

A prompt names each image with one placeholder token (the model's: `<image>`, `<|image_pad|>`);
processing turns each image into an item and writes the placeholder once per embedding of it.
Accepted prompts (as vLLM):
  {"prompt": "... <placeholder> ...", "multi_modal_data": {"image": img | [img, ...]},
   "multi_modal_uuids": {"image": uuid | [...]}}, or "prompt_token_ids" instead of "prompt"
where img is a PIL image, an RGB uint8 array [H, W, 3], or encoded bytes (decoded under ImageLimits);
with enable_mm_embeds=True, {"image_embeds": tensor [n, hidden] | [B, n, hidden]} instead.
Pixels come from the checkpoint's own image processor (transformers'), so they are what transformers
feeds the model; a model family sets `image_item_inputs(image)`: (pixel features, embeddings, grid). Transparent images are composited on white.
Chat parts: text, image_url ({"url": data:/file:/http(s) under the media policy}), image (a PIL image,
Python only), image_embeds. Templates that iterate a message's content parts (LLaVA-1.5's) get
[{"type": "image"}, {"type": "text", ...}] lists; others get text with `<image>` where each image was.
"""
import hashlib
import re

import numpy as np
import torch

from hark.chat import NO_CHAT_TEMPLATE, template_message
from hark.inputs import MultiModalItem, ProcessedPrompt
from hark.media import MediaPolicy, fetch_media
from hark.media.image import ImageLimits, check_image_size, decode_image, to_rgb
from hark.media.video import VideoLimits, decode_video
from hark.multimodal.audio_inputs import (as_list, as_prompt_dict, check_embeds, prompt_token_ids,
                                          read_chat_template, read_embeds_part, split_embeds)

DEFAULT_VIDEO_FPS = 2.0    # frames given without a rate: Qwen2-VL's sampling rate
MAX_NAMED = 256            # images kept under their multi_modal_uuids for later prompts
LIST_CONTENT = re.compile(r"""for\s+\w+\s+in\s+message\[['"]content['"]\]|message\[['"]content['"]\]\s*\|""")


class ImagePromptError(ValueError):
    """A prompt whose images and placeholders do not fit together, or an image that cannot be used."""


class ImagePromptProcessor:
    placeholder_text: str         # what a prompt writes for one image
    chat_placeholder: str         # what a chat message holds for an image (when its template takes text)
    # models that take video set these and video_item_inputs(frames, fps)
    video_token_id: int | None = None
    video_placeholder_text: str | None = None
    video_chat_placeholder: str | None = None
    num_video_frames = 32         # frames sampled from an encoded video (as vLLM's num_frames)

    def __init__(self, tokenizer, model_path: str, image_token_id: int, hidden_size: int):
        self.tokenizer = tokenizer
        self.model_id = model_path
        self.image_processor = self.load_image_processor(model_path)
        self.image_token_id = image_token_id
        self.image_token_text = tokenizer.convert_ids_to_tokens(image_token_id)
        self.hidden_size = hidden_size
        self.chat_template = getattr(tokenizer, "chat_template", None) or read_chat_template(model_path)
        self.limits: dict | None = None
        self.enable_mm_embeds = False
        self.image_limits = ImageLimits()
        self.media_policy = MediaPolicy()
        self.named: dict[tuple[str, str], MultiModalItem] = {}
        self.video_limits = VideoLimits()

    def load_image_processor(self, model_path: str):
        """The checkpoint's image processor (transformers')."""
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(model_path)

    def configure(self, config) -> None:
        """Takes the limits and media policy of an EngineConfig."""
        self.limits = config.limit_mm_per_prompt
        self.enable_mm_embeds = config.enable_mm_embeds
        self.media_policy = MediaPolicy(allowed_domains=tuple(config.allowed_media_domains),
                                        allowed_local_root=config.allowed_local_media_path)

    # --- prompts ------------------------------------------------------------------------------
    def process(self, prompt: str | dict) -> ProcessedPrompt:
        prompt = as_prompt_dict(prompt, ImagePromptError)
        items = self._items(prompt)
        ids = prompt_token_ids(prompt, self.encode_prompt, ImagePromptError)
        tokens = {self.image_token_id: "image", self.video_token_id: "video"}
        slots = [(i, tokens[t]) for i, t in enumerate(ids) if t in tokens]
        for kind, placeholder in (("image", self.placeholder_text), ("video", self.video_placeholder_text)):
            written = sum(k == kind for _, k in slots)
            if written != len(items[kind]):
                raise ImagePromptError(f"the prompt has {written} {kind} placeholder(s) ({placeholder}) but "
                                       f"{len(items[kind])} {kind}(s) were given; write one placeholder per {kind}.")
        pending = {kind: iter(found) for kind, found in items.items()}
        out, ordered, offsets, prev = [], [], [], 0
        for slot, kind in slots:
            item = next(pending[kind])
            out.extend(ids[prev:slot])
            offsets.append(len(out))
            ordered.append(item)
            out.extend([ids[slot]] * item.num_embeds)
            prev = slot + 1
        out.extend(ids[prev:])
        return ProcessedPrompt(out, ordered, offsets, prompt=prompt.get("prompt"))

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt's text, each image placeholder one image token."""
        return self.tokenizer.encode(self.token_text(text))

    def encode_chat_text(self, text: str) -> list[int]:
        """Token ids of a rendered chat template (which writes any special tokens itself)."""
        return self.tokenizer.encode(self.token_text(text), add_special_tokens=False)

    def chat_image_placeholder(self, index: int) -> str:
        """What a chat message whose template takes text holds for the conversation's index-th image (1-based)."""
        return self.chat_placeholder

    def token_text(self, text: str) -> str:
        text = text.replace(self.placeholder_text, self.image_token_text)
        return text if self.video_token_id is None else text.replace(self.video_placeholder_text, self.video_token_text)

    def _items(self, prompt: dict) -> dict[str, list[MultiModalItem]]:
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, dict):
            raise ImagePromptError("multi_modal_data must be a dict such as {'image': [PIL.Image, ...]}.")
        kinds = {"image", "image_embeds"} | ({"video"} if self.video_token_id is not None else set())
        unknown = sorted(set(data) - kinds)
        if unknown:
            raise ImagePromptError(f"multi_modal_data {unknown} is not supported by this model; it takes "
                                   f"{', '.join(repr(k) for k in sorted(kinds))} (image_embeds with "
                                   f"enable_mm_embeds=True).")
        images, videos = (data[k] if isinstance(data.get(k), list) else [data[k]] if k in data else []
                          for k in ("image", "video"))
        embeds = [e for x in as_list(data.get("image_embeds")) for e in split_embeds(x)]
        if images and embeds:
            raise ImagePromptError("a prompt takes either 'image' or 'image_embeds', not both.")
        for kind, count in (("image", len(images) + len(embeds)), ("video", len(videos))):
            limit = (self.limits or {}).get(kind)
            if limit is not None and count > limit:
                raise ImagePromptError(f"the prompt has {count} {kind}s; limit_mm_per_prompt allows {limit}.")
        uuids = (prompt.get("multi_modal_uuids") or {})
        image_uuids, video_uuids = as_list(uuids.get("image")), as_list(uuids.get("video"))
        for kind, given, named in (("image", images, image_uuids), ("video", videos, video_uuids)):
            if named and len(named) != len(given):
                raise ImagePromptError(f"multi_modal_uuids names {len(named)} {kind}s but {len(given)} were given.")
        return {"image": [self._image_item(img, u) for img, u in zip(images, image_uuids or [None] * len(images))]
                + [self._embeds_item(e) for e in embeds],
                "video": [self._video_item(v, u) for v, u in zip(videos, video_uuids or [None] * len(videos))]}

    def _named(self, kind: str, uuid) -> MultiModalItem:
        item = self.named.get((kind, str(uuid))) if uuid is not None else None
        if item is None:
            raise ImagePromptError(f"an {kind} in multi_modal_data is None and no {kind} was sent earlier under "
                                   f"its multi_modal_uuids name {uuid!r}; send the {kind}.")
        return item

    def _remember(self, kind: str, uuid, item: MultiModalItem) -> MultiModalItem:
        if uuid is not None:
            self.named[(kind, str(uuid))] = item
            if len(self.named) > MAX_NAMED:
                self.named.pop(next(iter(self.named)))
        return item

    def _image_item(self, image, uuid) -> MultiModalItem:
        if image is None:
            return self._named("image", uuid)
        image = self._as_rgb(image)
        features, num_embeds, grid = self.image_item_inputs(image)
        key = str(uuid) if uuid is not None else image_hash(image, self.model_id)
        return self._remember("image", uuid, MultiModalItem(features, 0, key, num_embeds, 0.0, grid_thw=grid))

    def _video_item(self, video, uuid) -> MultiModalItem:
        if video is None:
            return self._named("video", uuid)
        frames, fps = self._as_frames(video)
        features, num_embeds, grid = self.video_item_inputs(frames, fps)
        digest = hashlib.blake2b(f"{self.model_id}\0video\0{fps}\0".encode(), digest_size=32)
        for frame in frames:
            digest.update(frame.tobytes())
        key = str(uuid) if uuid is not None else digest.hexdigest()
        item = MultiModalItem(features, 0, key, num_embeds, len(frames) / fps, grid_thw=grid, fps=fps)
        return self._remember("video", uuid, item)

    def _as_frames(self, video) -> tuple[list, float]:
        """(RGB PIL frames, frames per second) of a video given as encoded bytes (decoded under VideoLimits,
        num_frames evenly spaced), a uint8 array [T, H, W, 3], a list of images, or (frames, {"fps": x})."""
        fps = DEFAULT_VIDEO_FPS
        if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
            video, fps = video[0], float(video[1].get("fps", fps))
        if isinstance(video, (bytes, bytearray)):
            decoded = decode_video(bytes(video), self.num_video_frames, self.video_limits)
            spans = np.diff(decoded.timestamps)
            fps = 1.0 / float(spans.mean()) if len(spans) else fps
            video = decoded.frames
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[3] != 3 or video.dtype != np.uint8:
                raise ImagePromptError(f"a video array must be uint8 [frames, H, W, 3], got {video.dtype} "
                                       f"{list(video.shape)}.")
            video = list(video)
        if not isinstance(video, list) or not video:
            raise ImagePromptError("a video must be encoded bytes, a uint8 array [frames, H, W, 3] or a list of frames.")
        if len(video) > self.video_limits.max_decoded_frames:
            raise ImagePromptError(f"the video has {len(video)} frames, over the limit of "
                                   f"{self.video_limits.max_decoded_frames}.")
        if not 0 < fps <= 240:
            raise ImagePromptError(f"video fps must be in (0, 240], got {fps:g}.")
        return [self._as_rgb(frame) for frame in video], fps

    def _as_rgb(self, image):
        from PIL import Image
        if isinstance(image, (bytes, bytearray)):
            return decode_image(bytes(image), self.image_limits)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
                raise ImagePromptError(f"an image array must be uint8 [H, W, 3 or 4], got {image.dtype} "
                                       f"{list(image.shape)}.")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ImagePromptError(f"an image must be a PIL image, a uint8 array or encoded bytes, "
                                   f"not {type(image).__name__}.")
        check_image_size(*image.size, self.image_limits)
        return to_rgb(image)

    def _embeds_item(self, embeds) -> MultiModalItem:
        if not self.enable_mm_embeds:
            raise ImagePromptError("image_embeds are disabled; start the engine with enable_mm_embeds=True.")
        embeds = check_embeds(embeds, self.hidden_size)
        digest = hashlib.blake2b(f"image_embeds\0{tuple(embeds.shape)}\0".encode(), digest_size=32)
        digest.update(embeds.float().contiguous().numpy().tobytes())
        return MultiModalItem(torch.empty(0), 0, digest.hexdigest(), embeds.shape[0], 0.0, embeddings=embeds)

    # --- chat ---------------------------------------------------------------------------------
    def build_chat_prompt(self, conversation: list[dict], chat_template: str | None, add_generation_prompt: bool,
                          template_kwargs: dict) -> dict:
        template = chat_template or self.chat_template
        if template is None:
            raise ImagePromptError(NO_CHAT_TEMPLATE)
        as_list_content = bool(LIST_CONTENT.search(template))
        images, videos, embeds, messages = [], [], [], []
        video_kinds = ("video_url", "video") if self.video_token_id is not None else ()
        for message in conversation:
            content = message.get("content")
            if content is None or isinstance(content, str):
                text = content or ""
                messages.append(template_message(message, [{"type": "text", "text": text}] if as_list_content
                                                 else text))
                continue
            parts, pieces = [], []      # template parts; the text pieces of a template that takes text
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                    pieces.append(part.get("text", ""))
                    continue
                if kind == "image_url" or (kind == "video_url" and video_kinds):
                    spec = part.get(kind)
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if not isinstance(url, str):
                        raise ImagePromptError(f"{kind} must be {{'url': 'data:...' | 'file:...' | 'https://...'}}.")
                    (images if kind == "image_url" else videos).append(fetch_media(url, self.media_policy))
                elif kind == "video" and video_kinds:
                    videos.append(part.get("video"))
                elif kind == "image":
                    images.append(part.get("image"))
                elif kind == "image_embeds":
                    embeds.append(read_embeds_part({"audio_embeds": part.get("image_embeds")}))
                else:
                    raise ImagePromptError(f"content part type {kind!r} is not supported by this model; use text, "
                                           f"image_url, image, image_embeds{', video_url, video' if video_kinds else ''}.")
                is_video = kind in video_kinds
                parts.append({"type": "video" if is_video else "image"})
                pieces.append(self.video_chat_placeholder if is_video
                              else self.chat_image_placeholder(len(images) + len(embeds)))
            messages.append(template_message(message, parts if as_list_content else "\n".join(pieces)))
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **template_kwargs)
        ids = self.encode_chat_text(text)
        data = {}
        if images:
            data["image"] = images
        if videos:
            data["video"] = videos
        if embeds:
            data["image_embeds"] = embeds
        return {"prompt_token_ids": ids, "prompt": text, "multi_modal_data": data}


def image_hash(image, model_id: str) -> str:
    """Key of an RGB image under a model: its size and pixel bytes."""
    digest = hashlib.blake2b(f"{model_id}\0image\0{image.size}\0".encode(), digest_size=32)
    digest.update(image.tobytes())
    return digest.hexdigest()
