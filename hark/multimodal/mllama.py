"""Llama 3.2 Vision (mllama) prompts: each image is written `<|image|>`, which stays one token (the images
reach the LM through cross-attention, not as embeddings in the token stream).

Text is written as transformers' MllamaProcessor writes it (build_string_from_input): without the
tokenizer's bos token in it, bos goes after the leading `<|image|>`s; then the tokenizer adds its own
special tokens. Pixels: the checkpoint's MllamaImageProcessor (the image resized onto the best canvas
of at most max_image_tiles tiles, padded, cut into tiles, zero tiles up to max_image_tiles), so they
are what transformers feeds the model; the canvas (rows, cols) goes with the item as its grid (1, rows, cols).

Prompts: vLLM's implicit {"prompt": "<|image|>...", "multi_modal_data": {"image": ...}} (see
hark.multimodal.image_inputs for what it accepts), or the explicit
{"encoder_prompt": {"prompt": "<|image|>", "multi_modal_data": {"image": ...}}, "decoder_prompt": "<|image|>..."},
where the encoder prompt holds the images (its text, if any, only their `<|image|>`s) and the decoder
prompt the tokens, one `<|image|>` per image where it is seen from. Both give the same request.
"""
from hark.inputs import ProcessedPrompt
from hark.models.mllama_vision import aspect_ratios
from hark.multimodal.image_inputs import ImagePromptError, ImagePromptProcessor

PLACEHOLDER = "<|image|>"


class MllamaProcessor(ImagePromptProcessor):
    placeholder_text = PLACEHOLDER
    chat_placeholder = PLACEHOLDER

    def __init__(self, hf_config, tokenizer, model_path: str):
        super().__init__(tokenizer, model_path, hf_config.image_token_index, hf_config.text_config.hidden_size)
        tiles = hf_config.vision_config.max_num_tiles
        if self.image_processor.max_image_tiles != tiles:
            raise ValueError(f"the image processor cuts images into up to {self.image_processor.max_image_tiles} "
                             f"tiles but the model takes {tiles}.")
        self.canvases = aspect_ratios(tiles)
        self.bos_text = tokenizer.bos_token

    def token_text(self, text: str) -> str:
        """transformers' build_string_from_input: bos after the leading images unless the text has it."""
        if not self.bos_text or self.bos_text in text:
            return text
        images = 0
        while text.startswith(PLACEHOLDER):
            text = text[len(PLACEHOLDER):]
            images += 1
        return PLACEHOLDER * images + self.bos_text + text

    def process(self, prompt) -> ProcessedPrompt:
        if isinstance(prompt, dict) and "encoder_prompt" in prompt:
            prompt = self._implicit(prompt)
        processed = super().process(prompt)
        if processed.mm_items:
            processed.encoder_prompt_token_ids = [self.image_token_id] * len(processed.mm_items)
        return processed

    def _implicit(self, prompt: dict) -> dict:
        """An explicit encoder / decoder prompt as the implicit prompt it stands for."""
        encoder, decoder = prompt["encoder_prompt"], prompt.get("decoder_prompt")
        if isinstance(encoder, str):
            encoder = {"prompt": encoder}
        if not isinstance(encoder, dict):
            raise ImagePromptError("encoder_prompt must be a dict holding the images in multi_modal_data.")
        text, ids = encoder.get("prompt") or "", encoder.get("prompt_token_ids") or []
        if text.replace(PLACEHOLDER, "").strip() or any(int(t) != self.image_token_id for t in ids):
            raise ImagePromptError(f"mllama's encoder_prompt holds only images (its text, if any, one {PLACEHOLDER} "
                                   f"per image); put the text in decoder_prompt.")
        images = (encoder.get("multi_modal_data") or {}).get("image")
        count = len(images) if isinstance(images, list) else int(images is not None)
        written = text.count(PLACEHOLDER) + len(ids)
        if written and written != count:
            raise ImagePromptError(f"encoder_prompt writes {written} {PLACEHOLDER} for {count} image(s).")
        if decoder is None:
            raise ImagePromptError(f"an explicit mllama prompt needs a decoder_prompt with one {PLACEHOLDER} per image.")
        implicit = {key: encoder[key] for key in ("multi_modal_data", "multi_modal_uuids") if key in encoder}
        if isinstance(decoder, dict):
            if decoder.get("multi_modal_data"):
                raise ImagePromptError("put the images in encoder_prompt's multi_modal_data, not in decoder_prompt.")
            implicit.update({k: decoder[k] for k in ("prompt", "prompt_token_ids") if k in decoder})
        elif isinstance(decoder, str):
            implicit["prompt"] = decoder
        else:
            implicit["prompt_token_ids"] = list(decoder)
        return implicit

    def image_item_inputs(self, image):
        out = self.image_processor(images=[[image]], return_tensors="pt")
        rows, cols = self.canvases[int(out["aspect_ratio_ids"][0, 0]) - 1]
        return out["pixel_values"][0, 0], 1, (1, rows, cols)

    def _embeds_item(self, embeds):
        raise ImagePromptError("image_embeds are not supported for mllama (its images are cross-attended); "
                               "send the images.")
