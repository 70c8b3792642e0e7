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
from hark.inputs import AudioItem, ProcessedPrompt
from hark.media import MediaPolicy, fetch_media
from hark.media.image import ImageLimits, check_image_size, decode_image, to_rgb
from hark.multimodal.audio_inputs import (as_list, check_embeds, read_chat_template, read_embeds_part,
                                          split_embeds)

MAX_NAMED = 256            # images kept under their multi_modal_uuids for later prompts
LIST_CONTENT = re.compile(r"""for\s+\w+\s+in\s+message\[['"]content['"]\]|message\[['"]content['"]\]\s*\|""")


class ImagePromptError(ValueError):
    """A prompt whose images and placeholders do not fit together, or an image that cannot be used."""


class ImagePromptProcessor:
    placeholder_text: str         # what a prompt writes for one image
    chat_placeholder: str         # what a chat message holds for an image (when its template takes text)

    def __init__(self, tokenizer, model_path: str, image_token_id: int, hidden_size: int):
        from transformers import AutoImageProcessor
        self.tokenizer = tokenizer
        self.model_id = model_path
        self.image_processor = AutoImageProcessor.from_pretrained(model_path)
        self.image_token_id = image_token_id
        self.image_token_text = tokenizer.convert_ids_to_tokens(image_token_id)
        self.hidden_size = hidden_size
        self.chat_template = getattr(tokenizer, "chat_template", None) or read_chat_template(model_path)
        self.limit = None
        self.enable_mm_embeds = False
        self.image_limits = ImageLimits()
        self.media_policy = MediaPolicy()
        self.named: dict[str, AudioItem] = {}

    def configure(self, config) -> None:
        """Takes the limits and media policy of an EngineConfig."""
        self.limit = (config.limit_mm_per_prompt or {}).get("image")
        self.enable_mm_embeds = config.enable_mm_embeds
        self.media_policy = MediaPolicy(allowed_domains=tuple(config.allowed_media_domains),
                                        allowed_local_root=config.allowed_local_media_path)

    # --- prompts ------------------------------------------------------------------------------
    def process(self, prompt: str | dict) -> ProcessedPrompt:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise ImagePromptError("a prompt must be a string, {'prompt': str, 'multi_modal_data': ...} "
                                   "or {'prompt_token_ids': [...], 'multi_modal_data': ...}.")
        items = self._image_items(prompt)
        text = prompt.get("prompt")
        if prompt.get("prompt_token_ids") is not None:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        elif isinstance(text, str):
            ids = self.tokenizer.encode(text.replace(self.placeholder_text, self.image_token_text))
        else:
            raise ImagePromptError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'.")
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(items):
            raise ImagePromptError(f"the prompt has {len(slots)} image placeholder(s) ({self.placeholder_text}) but "
                                   f"{len(items)} image(s) were given; write one placeholder per image.")
        out, offsets, prev = [], [], 0
        for slot, item in zip(slots, items):
            out.extend(ids[prev:slot])
            offsets.append(len(out))
            out.extend([self.image_token_id] * item.num_embeds)
            prev = slot + 1
        out.extend(ids[prev:])
        return ProcessedPrompt(out, items, offsets, prompt=text)

    def _image_items(self, prompt: dict) -> list[AudioItem]:
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, dict):
            raise ImagePromptError("multi_modal_data must be a dict such as {'image': [PIL.Image, ...]}.")
        unknown = sorted(set(data) - {"image", "image_embeds"})
        if unknown:
            raise ImagePromptError(f"multi_modal_data {unknown} is not supported by this model; it takes 'image' "
                                   f"(or 'image_embeds' with enable_mm_embeds=True).")
        images = data["image"] if isinstance(data.get("image"), list) else [data["image"]] if "image" in data else []
        embeds = [e for x in as_list(data.get("image_embeds")) for e in split_embeds(x)]
        if images and embeds:
            raise ImagePromptError("a prompt takes either 'image' or 'image_embeds', not both.")
        count = len(images) + len(embeds)
        if self.limit is not None and count > self.limit:
            raise ImagePromptError(f"the prompt has {count} images; limit_mm_per_prompt allows {self.limit}.")
        uuids = as_list((prompt.get("multi_modal_uuids") or {}).get("image"))
        if uuids and len(uuids) != len(images):
            raise ImagePromptError(f"multi_modal_uuids names {len(uuids)} images but {len(images)} were given.")
        items = [self._image_item(img, uuid) for img, uuid in zip(images, uuids or [None] * len(images))]
        return items + [self._embeds_item(e) for e in embeds]

    def _image_item(self, image, uuid) -> AudioItem:
        if image is None:
            item = self.named.get(str(uuid)) if uuid is not None else None
            if item is None:
                raise ImagePromptError("an image in multi_modal_data is None and no image was sent earlier under "
                                       f"its multi_modal_uuids name {uuid!r}; send the image.")
            return item
        image = self._as_rgb(image)
        features, num_embeds, grid = self.image_item_inputs(image)
        key = str(uuid) if uuid is not None else image_hash(image, self.model_id)
        item = AudioItem(features, 0, key, num_embeds, 0.0, grid_thw=grid)
        if uuid is not None:
            self.named[str(uuid)] = item
            if len(self.named) > MAX_NAMED:
                self.named.pop(next(iter(self.named)))
        return item

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

    def _embeds_item(self, embeds) -> AudioItem:
        if not self.enable_mm_embeds:
            raise ImagePromptError("image_embeds are disabled; start the engine with enable_mm_embeds=True.")
        embeds = check_embeds(embeds, self.hidden_size)
        digest = hashlib.blake2b(f"image_embeds\0{tuple(embeds.shape)}\0".encode(), digest_size=32)
        digest.update(embeds.float().contiguous().numpy().tobytes())
        return AudioItem(torch.empty(0), 0, digest.hexdigest(), embeds.shape[0], 0.0, embeddings=embeds)

    # --- chat ---------------------------------------------------------------------------------
    def build_chat_prompt(self, conversation: list[dict], chat_template: str | None, add_generation_prompt: bool,
                          template_kwargs: dict) -> dict:
        template = chat_template or self.chat_template
        if template is None:
            raise ImagePromptError(NO_CHAT_TEMPLATE)
        as_list_content = bool(LIST_CONTENT.search(template))
        images, embeds, messages = [], [], []
        for message in conversation:
            content = message.get("content")
            if content is None or isinstance(content, str):
                text = content or ""
                messages.append(template_message(message, [{"type": "text", "text": text}] if as_list_content
                                                 else text))
                continue
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                    continue
                if kind == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if not isinstance(url, str):
                        raise ImagePromptError("image_url must be {'url': 'data:...' | 'file:...' | 'https://...'}.")
                    images.append(fetch_media(url, self.media_policy))
                elif kind == "image":
                    images.append(part.get("image"))
                elif kind == "image_embeds":
                    embeds.append(read_embeds_part({"audio_embeds": part.get("image_embeds")}))
                else:
                    raise ImagePromptError(f"content part type {kind!r} is not supported by this model; use text, "
                                           f"image_url, image or image_embeds.")
                parts.append({"type": "image"})
            if as_list_content:
                messages.append(template_message(message, parts))
            else:
                text = "\n".join(self.chat_placeholder if p["type"] == "image" else p["text"] for p in parts)
                messages.append(template_message(message, text))
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **template_kwargs)
        ids = self.tokenizer.encode(text.replace(self.placeholder_text, self.image_token_text), add_special_tokens=False)
        data = {}
        if images:
            data["image"] = images
        if embeds:
            data["image_embeds"] = embeds
        return {"prompt_token_ids": ids, "prompt": text, "multi_modal_data": data}


def image_hash(image, model_id: str) -> str:
    """Key of an RGB image under a model: its size and pixel bytes."""
    digest = hashlib.blake2b(f"{model_id}\0image\0{image.size}\0".encode(), digest_size=32)
    digest.update(image.tobytes())
    return digest.hexdigest()
