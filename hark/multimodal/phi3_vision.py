"""Phi-3.5-vision / Phi-3-vision prompts (`Phi3VForCausalLM`), as its remote Phi3VProcessor builds them.

Images are written `<|image_1|>`, `<|image_2|>`, ... (1-based, each of the prompt's images once), as in
vLLM's example `<|user|>\\n<|image_1|>\\n<|image_2|>\\nWhat is in these images?<|end|>\\n<|assistant|>\\n`;
`<|image_k|>` takes the k-th image. The processor splits the text at those tags and tokenizes every
piece on its own with the tokenizer's special tokens (a Llama tokenizer that adds BOS puts one before
each piece, as the remote processor does); each tag becomes the image's tokens (the `<|image|>` token,
the remote processor's -k ids). prompt_token_ids mark each image with one `<|image|>` token, in order.

Pixels: the remote Phi3VImageProcessor's HD transform, for num_crops (preprocessor_config.json):
  1. a portrait image is transposed (worked on as landscape, transposed back at the end);
  2. scale = the largest s with s * ceil(s / ratio) <= num_crops (ratio = width / height >= 1); resize
     (PIL bilinear) to width 336 s, height int(336 s / ratio);
  3. pad the height with white to a multiple of 336 (the extra rows split top / bottom, the odd row below);
  4. to [0, 1] floats, normalise by image_mean / image_std (CLIP's), then a bicubic resize of the whole
     to 336 x 336 (the global image) and the 336 x 336 crops in raster order.
The item's features are [1 + rows * cols, 3, 336, 336], the global image first (the remote processor
also zero-pads every image to num_crops + 1 crops; those are never read). Tokens per image, with
m = (336 / 14) / 2 = 12 merged patches a side: rows * m * (cols * m + 1) + 1 + m * (m + 1), which is the
remote (rows * cols + 1) * 144 + 1 + (rows + 1) * 12 (a 512 x 512 photo at num_crops 4: 2 x 2 crops, 757).
"""
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from hark.inputs import MultiModalItem
from hark.multimodal.image_inputs import ImagePromptError, ImagePromptProcessor

TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN = "<|image|>"
CROP = 336
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """Crops across the long side: the largest s with s * ceil(s / ratio) <= num_crops."""
    ratio = max(width, height) / min(width, height)
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_transform(image, num_crops: int):
    """The RGB PIL image resized and white-padded to whole 336-pixel crops (steps 1-3 above)."""
    from PIL import Image
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    width = hd_scale(image.width, image.height, num_crops) * CROP
    height = int(width / ratio)
    if height < 1:
        raise ImagePromptError(f"an image of {image.width} x {image.height} pixels is too far from square for "
                               f"Phi-3-vision's crops; crop it closer to square.")
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    padded = Image.new("RGB", (width, math.ceil(height / CROP) * CROP), (255, 255, 255))
    padded.paste(image, (0, (padded.height - height) // 2))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def image_settings(model_path: str) -> dict:
    """preprocessor_config.json's Phi3VImageProcessor settings (the remote class's defaults where absent)."""
    path = os.path.join(model_path, "preprocessor_config.json")
    settings = {}
    if os.path.exists(path):
        with open(path) as f:
            settings = json.load(f)
    kind = settings.get("image_processor_type", "Phi3VImageProcessor")
    if kind != "Phi3VImageProcessor":
        raise ValueError(f"preprocessor_config.json names {kind!r}; Phi-3-vision takes Phi3VImageProcessor.")
    num_crops = settings.get("num_crops", 1)
    if not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"preprocessor_config.json num_crops must be a positive integer, got {num_crops!r}.")
    return {"num_crops": num_crops, "image_mean": tuple(settings.get("image_mean") or OPENAI_CLIP_MEAN),
            "image_std": tuple(settings.get("image_std") or OPENAI_CLIP_STD)}


class Phi3VisionProcessor(ImagePromptProcessor):
    placeholder_text = "<|image_k|>"     # named in errors; prompts write <|image_1|>, <|image_2|>, ...
    chat_placeholder = "<|image_1|>"

    def __init__(self, hf_config, tokenizer, model_path: str):
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token, which Phi-3-vision's image tokens use.")
        super().__init__(tokenizer, model_path, image_token_id, hf_config.hidden_size)
        vision = hf_config.vision_config
        if vision.image_size != CROP:
            raise ValueError(f"Phi-3-vision crops are {CROP} pixels; the vision tower takes {vision.image_size}.")
        self.merged = vision.image_size // vision.patch_size // 2      # 12: merged patches across a crop

    def load_image_processor(self, model_path: str) -> dict:
        return image_settings(model_path)           # the remote Phi3VImageProcessor, done here

    # --- pixels -------------------------------------------------------------------------------
    def image_item_inputs(self, image):
        settings = self.image_processor
        hd = hd_transform(image, settings["num_crops"])
        pixels = torch.from_numpy(np.array(hd)).permute(2, 0, 1).float().div(255)
        mean, std = (torch.tensor(settings[k]).view(3, 1, 1) for k in ("image_mean", "image_std"))
        pixels = (pixels - mean) / std
        rows, cols = pixels.shape[1] // CROP, pixels.shape[2] // CROP
        whole = F.interpolate(pixels[None], size=(CROP, CROP), mode="bicubic")
        crops = pixels.view(3, rows, CROP, cols, CROP).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, CROP, CROP)
        return torch.cat([whole, crops]), self.num_image_tokens(rows, cols), (1, rows, cols)

    def num_image_tokens(self, rows: int, cols: int) -> int:
        m = self.merged
        return rows * m * (cols * m + 1) + 1 + m * (m + 1)

    # --- prompts ------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """The remote processor's ids: the text between tags tokenized piece by piece, one image token a tag."""
        if IMAGE_TOKEN in text:
            raise ImagePromptError(f"write images as <|image_1|>, <|image_2|>, ... (not {IMAGE_TOKEN}).")
        ids = []
        for i, piece in enumerate(TAG.split(text)):
            if i % 2:
                ids.append(self.image_token_id)
            else:
                ids.extend(self.tokenizer.encode(piece))
        return ids

    def encode_chat_text(self, text: str) -> list[int]:
        return self.encode_prompt(text)             # the remote processor runs over the rendered template

    def chat_image_placeholder(self, index: int) -> str:
        return f"<|image_{index}|>"

    def _items(self, prompt: dict) -> dict[str, list[MultiModalItem]]:
        """The images in the order the prompt's tags name them (`<|image_k|>` takes the k-th)."""
        items = super()._items(prompt)
        text = prompt.get("prompt")
        numbers = [int(n) for n in TAG.findall(text)] if isinstance(text, str) else []
        images = items["image"]
        if numbers and len(numbers) == len(images):     # other counts: process() names the mismatch
            if sorted(numbers) != list(range(1, len(images) + 1)):
                raise ImagePromptError(f"the prompt's image tags {['<|image_%d|>' % n for n in numbers]} must name "
                                       f"each of its {len(images)} image(s) once, as <|image_1|> .. "
                                       f"<|image_{len(images)}|>.")
            items["image"] = [images[n - 1] for n in numbers]
        return items
