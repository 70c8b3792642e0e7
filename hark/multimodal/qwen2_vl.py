"""Qwen2-VL prompts: each image is written `<|vision_start|><|image_pad|><|vision_end|>` and its
<|image_pad|> becomes t * h * w / 4 tokens for the patch grid (t, h, w) the checkpoint's image processor
picks (native resolution: the image resized to multiples of 28 within min_pixels..max_pixels).
See hark.multimodal.image_inputs for the prompts and chat parts accepted.
"""
from hark.multimodal.image_inputs import ImagePromptProcessor

PLACEHOLDER = "<|image_pad|>"


class Qwen2VLProcessor(ImagePromptProcessor):
    placeholder_text = PLACEHOLDER
    chat_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, hf_config, tokenizer, model_path: str):
        token_id = getattr(hf_config, "image_token_id", None)
        if token_id is None:
            token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        super().__init__(tokenizer, model_path, token_id, hf_config.text_config.hidden_size)
        self.merge = hf_config.vision_config.spatial_merge_size

    def image_item_inputs(self, image):
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = tuple(int(g) for g in out["image_grid_thw"][0])
        return out["pixel_values"], grid[0] * grid[1] * grid[2] // self.merge ** 2, grid
