"""Qwen2-VL prompts: each image is written `<|vision_start|><|image_pad|><|vision_end|>` and its
<|image_pad|> becomes t * h * w / 4 tokens for the patch grid (t, h, w) the checkpoint's image processor
picks (native resolution: the image resized to multiples of 28 within min_pixels..max_pixels).

Video (`<|vision_start|><|video_pad|><|vision_end|>`, multi_modal_data {"video": ...}, chat parts
video_url / video): each frame is resized and normalised by the same image processor (transformers'
Qwen2-VL video processor needs torchvision, which does not install beside the CPU torch here; it
resizes with torchvision's bicubic, so pixels may differ from it by rounding), the frame count padded
to a multiple of temporal_patch_size (2) with the last frame, and each pair of frames makes one
temporal patch: grid (frames / 2, h, w), grid / 4 tokens.
See hark.multimodal.image_inputs for the prompts and chat parts accepted.
"""
import torch
from hark.multimodal.image_inputs import ImagePromptProcessor

PLACEHOLDER = "<|image_pad|>"
VIDEO_PLACEHOLDER = "<|video_pad|>"


class Qwen2VLProcessor(ImagePromptProcessor):
    placeholder_text = PLACEHOLDER
    chat_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, hf_config, tokenizer, model_path: str):
        token_id = getattr(hf_config, "image_token_id", None)
        if token_id is None:
            token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        super().__init__(tokenizer, model_path, token_id, hf_config.text_config.hidden_size)
        vision = hf_config.vision_config
        self.merge, self.temporal = vision.spatial_merge_size, vision.temporal_patch_size
        video_id = getattr(hf_config, "video_token_id", None)
        if video_id is None or tokenizer.convert_ids_to_tokens(video_id) is None:   # config default, not in vocab
            video_id = tokenizer.get_vocab().get(VIDEO_PLACEHOLDER)
        if video_id is not None:
            self.video_token_id, self.video_token_text = video_id, tokenizer.convert_ids_to_tokens(video_id)
            self.video_placeholder_text = VIDEO_PLACEHOLDER
            self.video_chat_placeholder = "<|vision_start|><|video_pad|><|vision_end|>"

    def image_item_inputs(self, image):
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = tuple(int(g) for g in out["image_grid_thw"][0])
        return out["pixel_values"], grid[0] * grid[1] * grid[2] // self.merge ** 2, grid

    def video_item_inputs(self, frames, fps: float):
        out = self.image_processor(images=frames, return_tensors="pt")
        _, h, w = (int(g) for g in out["image_grid_thw"][0])
        if any(tuple(g.tolist()) != (1, h, w) for g in out["image_grid_thw"]):
            raise ValueError("video frames must all have the same size.")
        per_frame = out["pixel_values"].view(len(frames), h * w, 3, self.temporal, -1)[:, :, :, 0]   # one copy each
        pad = -len(frames) % self.temporal
        per_frame = torch.cat([per_frame, per_frame[-1:].expand(pad, -1, -1, -1)]) if pad else per_frame
        t = per_frame.shape[0] // self.temporal
        patches = per_frame.view(t, self.temporal, h * w, 3, -1).permute(0, 2, 3, 1, 4).reshape(t * h * w, -1)
        return patches, t * h * w // self.merge ** 2, (t, h, w)
