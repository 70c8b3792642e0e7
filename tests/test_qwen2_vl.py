"""Qwen2-VL and Qwen2.5-VL (windowed vision attention) on hark: greedy parity with transformers on a tiny random checkpoint with real photos of different
sizes (native-resolution grids, M-RoPE positions), 0, 1 and 2 images per prompt, batched; chat; logits."""

import pytest
import torch

from hark import LLM, SamplingParams
from conftest import make_byte_tokenizer, randomize
from test_llava import photos

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)   # as min_new_tokens: no EOS
# Qwen2-VL's template, cut down: a message's parts in order, images as vision spans
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)


VISION_CONFIGS = {   # Qwen2.5-VL: windows of 56 px = 2 x 2 merge units, block 1 of 3 attends to the whole image
    "Qwen2VLForConditionalGeneration": dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, mlp_ratio=2),
    "Qwen2_5_VLForConditionalGeneration": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                                               out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
}


@pytest.fixture(scope="module", params=list(VISION_CONFIGS))
def ckpt(request, tmp_path_factory):
    import transformers
    arch = request.param
    path = str(tmp_path_factory.mktemp(arch))
    tok = make_byte_tokenizer(path, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"], TEMPLATE)
    config_cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    config = config_cls(
        vision_config=dict(**VISION_CONFIGS[arch], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        architectures=[arch], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    randomize(model, std=0.1)
    model.eval()
    model.save_pretrained(path)
    image_processor().save_pretrained(path)
    return path, model, tok


def reference_inputs(tok, text: str, images: list) -> dict:
    """transformers' image processor, and <|image_pad|> repeated grid.prod() / 4 times and marked in
    mm_token_type_ids as Qwen2VLProcessor writes them (that class needs torchvision for its video half)."""
    inputs = {}
    if images:
        inputs = dict(image_processor()(images=images, return_tensors="pt"))
        pieces = text.split("<|image_pad|>")
        counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
        text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = torch.tensor([tok.encode(text)])
    image_tokens = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()     # the processor's mm_token_type_ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": image_tokens, **inputs}


VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def pan(frames: int = 5, size=(112, 84)):
    """A short video of real pixels: a window panning across the Hubble deep field, uint8 [T, H, W, 3]."""
    import numpy as np
    hubble = photos()[1].resize((300, 200))
    return np.stack([np.asarray(hubble.crop((20 * i, 10 * i, 20 * i + size[0], 10 * i + size[1])))
                     for i in range(frames)])


def reference_video_inputs(tok, text: str, video, fps: float) -> dict:
    """What Qwen2-VL's video processor gives, rebuilt from the image processor (it needs torchvision): frames
    resized and normalised, the count padded to even with the last frame, each pair one temporal patch."""
    out = image_processor()(images=list(video), return_tensors="pt")
    _, h, w = out["image_grid_thw"][0].tolist()
    frames = out["pixel_values"].view(len(video), h * w, 3, 2, 14 * 14)[:, :, :, 0]
    if len(video) % 2:
        frames = torch.cat([frames, frames[-1:]])
    t = frames.shape[0] // 2
    pixels = torch.stack([torch.stack([frames[2 * k], frames[2 * k + 1]], dim=3) for k in range(t)]).reshape(t * h * w, -1)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4))
    ids = torch.tensor([tok.encode(text)])
    kinds = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int() * 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": kinds,
            "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]]),
            "second_per_grid_ts": torch.tensor([2 / fps])}


def reference(model, tok, text: str, images: list) -> list[int]:
    inputs = reference_inputs(tok, text, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


CASES = [
    ("text only, no image", []),
    (f"{VISION}what is in it?", [0]),
    (f"first {VISION} then {VISION} which is the sky?", [1, 2]),
    (f"{VISION}the astronaut again, wider: {VISION}", [0, 1]),
]


def test_greedy_matches_transformers(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path, max_num_batched_tokens=32)          # chunked prefill cuts through the image spans
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} if idx else text
               for text, idx in CASES]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(model, tok, text, [images[i] for i in idx]) for text, idx in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    grids = {tuple(g) for g in image_processor()(images=images, return_tensors="pt")["image_grid_thw"].tolist()}
    assert len(grids) == 3                               # three different grids: native resolution
    assert llm.llm_engine.executor.runner.encoder_items == 3


def test_logits_close_and_chat(ckpt):
    path, model, tok = ckpt
    image = photos()[1]
    llm = LLM(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "sky?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    assert out.prompt == f"<|im_start|>user\n{VISION}sky?<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        logits = model(**reference_inputs(tok, out.prompt, [image])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    for token, logprob in out.outputs[0].logprobs[0].items():
        assert abs(logprob.logprob - expected[token].item()) < 1e-4


def test_image_embeddings_close_to_transformers(ckpt):
    """The vision tower's outputs themselves (greedy ids of a tiny LM can hide a wrong attention window)."""
    path, model, tok = ckpt
    llm = LLM(path)
    images = photos()
    items = [llm.llm_engine.process_prompt({"prompt": VISION, "multi_modal_data": {"image": im}}).mm_items[0]
             for im in images]
    mine = llm.llm_engine.encode(items)
    inputs = image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        theirs = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_video_matches_transformers(ckpt):
    """A 5-frame video (padded to 6: 3 temporal patches) with an image in the same prompt; at 1 fps Qwen2.5-VL's
    time axis moves 2 x tokens_per_second per temporal patch. Also as an mp4 file decoded by hark."""
    import av
    import io
    path, model, tok = ckpt
    video, fps = pan(), 1.0
    text = f"{VISION}and then {VIDEO}what moves?"
    llm = LLM(path)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": photos()[0], "video": (video, {"fps": fps})}},
                       GREEDY, use_tqdm=False)[0]
    image_inputs = reference_inputs(tok, f"{VISION}", [photos()[0]])
    inputs = reference_video_inputs(tok, text, video, fps)
    n_image = int(image_inputs["image_grid_thw"].prod()) // 4
    inputs["input_ids"] = torch.tensor([tok.encode(text.replace("<|image_pad|>", "<|image_pad|>" * n_image, 1)
                                                   .replace("<|video_pad|>", "<|video_pad|>" * (inputs["pixel_values_videos"].shape[0] // 4)))])
    ids = inputs["input_ids"]
    inputs["attention_mask"] = torch.ones_like(ids)
    inputs["mm_token_type_ids"] = ((ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()
                                   + 2 * (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int())
    inputs.update(pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"])
    if "Qwen2VL" in model.__class__.__name__:
        inputs.pop("second_per_grid_ts")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert out.outputs[0].token_ids == expected
    assert len(out.prompt_token_ids) == ids.shape[1]

    buf = io.BytesIO()                                     # the same frames as an mp4 file, decoded by hark
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 112, 84, "yuv420p", 4_000_000
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    decoded = llm.generate({"prompt": f"{VIDEO}what moves?", "multi_modal_data": {"video": buf.getvalue()}},
                           GREEDY, use_tqdm=False)[0]
    assert len(decoded.prompt_token_ids) == len(tok.encode("what moves?")) + 2 + 3 * (8 * 6 // 4)
    with pytest.raises(ValueError, match="video placeholder"):
        llm.generate({"prompt": "no placeholder", "multi_modal_data": {"video": video}}, GREEDY)
