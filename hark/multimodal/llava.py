"""LLaVA prompts: each image is written `<image>` and becomes the vision tower's patch count of tokens
((336 / 14)^2 = 576 for LLaVA-1.5; one more with vision_feature_select_strategy "full"). Pixels: the
checkpoint's CLIP image processor (resize the short side, centre crop, normalise). See
hark.multimodal.image_inputs for the prompts and chat parts accepted.
"""
from hark.multimodal.image_inputs import ImagePromptProcessor

PLACEHOLDER = "<image>"


class LlavaProcessor(ImagePromptProcessor):
    placeholder_text = PLACEHOLDER
    chat_placeholder = PLACEHOLDER

    def __init__(self, hf_config, tokenizer, model_path: str):
        super().__init__(tokenizer, model_path, hf_config.image_token_index, hf_config.text_config.hidden_size)
        vision = hf_config.vision_config
        self.image_tokens = ((vision.image_size // vision.patch_size) ** 2
                             + (hf_config.vision_feature_select_strategy == "full"))

    def image_item_inputs(self, image):
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels, self.image_tokens, None
