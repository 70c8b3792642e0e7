"""LLaVA-1.5 on hark: greedy parity with transformers on a tiny random checkpoint with real photos (0, 1 and
2 images per prompt, batched), chat with image_url parts and LLaVA's own template, caches, limits, errors."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hark import LLM, SamplingParams
from conftest import image_data_url, make_byte_tokenizer, randomize

DATA = os.path.join(os.path.dirname(__file__), "data")
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# llava-hf/llava-1.5-7b-hf's chat template: images first, then the text of each message
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def photo(name: str) -> Image.Image:
    return Image.open(os.path.join(DATA, name)).convert("RGB")


def photos():
    """Real photos (scikit-image's data): the astronaut, and two crops of the Hubble deep field."""
    hubble = photo("hubble_deep_field.jpg")
    return [photo("astronaut_160.jpg"), hubble.crop((0, 0, 300, 200)), hubble.crop((400, 500, 640, 900))]


def make_tiny_llava(path: str):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration
    tok = make_byte_tokenizer(path, ["<image>"], LLAVA_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         architectures=["LlavaForConditionalGeneration"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    randomize(model, std=0.1)
    model.eval()
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llava"))
    return path, *make_tiny_llava(path)


def reference(path, model, tok, text: str, images: list) -> list[int]:
    """transformers' own processor and model, one prompt at a time."""
    from transformers import AutoImageProcessor, LlavaProcessor
    processor = LlavaProcessor(AutoImageProcessor.from_pretrained(path), tok, patch_size=14,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default")
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


CASES = [
    ("USER: no image, just text ASSISTANT:", []),
    ("USER: <image>\nwhat is in it? ASSISTANT:", [0]),
    ("USER: <image>\nfirst, <image>\nthen: which is the sky? ASSISTANT:", [1, 2]),
    ("USER: <image>\nthe astronaut again ASSISTANT:", [0]),
]


def test_greedy_matches_transformers(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path, max_num_batched_tokens=24)          # chunked prefill cuts through the 16-token images
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} if idx else text
               for text, idx in CASES]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(path, model, tok, text, [images[i] for i in idx]) for text, idx in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len(outs[2].prompt_token_ids) == len(tok.encode(CASES[2][0])) + 2 * (16 - 1)
    runner = llm.llm_engine.executor.runner
    assert runner.encoder_items == 3                     # the astronaut is encoded once for two prompts


def test_logits_close_to_transformers(ckpt):
    from transformers import AutoImageProcessor, LlavaProcessor
    path, model, tok = ckpt
    image = photos()[0]
    text = "USER: <image>\ndescribe ASSISTANT:"
    llm = LLM(path)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": image}},
                       SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), use_tqdm=False)[0].outputs[0]
    processor = LlavaProcessor(AutoImageProcessor.from_pretrained(path), tok, patch_size=14,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default")
    with torch.no_grad():
        logits = model(**processor(text=text, images=[image], return_tensors="pt")).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    for token, logprob in out.logprobs[0].items():
        assert abs(logprob.logprob - expected[token].item()) < 1e-4




def test_chat_with_image_url_parts_uses_the_list_template(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(images[1])}},
        {"type": "text", "text": "which is the sky?"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = "USER: <image>\nwhich is the sky? ASSISTANT:"
    assert out.prompt == text
    assert out.outputs[0].token_ids == reference(path, model, tok, text, [images[1]])


def test_rgba_and_array_inputs(ckpt):
    path, _, _ = ckpt
    llm = LLM(path)
    rgb = np.asarray(photos()[0])
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    text = "USER: <image>\nsame? ASSISTANT:"
    outs = llm.generate([{"prompt": text, "multi_modal_data": {"image": x}} for x in (photos()[0], rgb, rgba)],
                        GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids


def test_limits_and_errors(ckpt):
    path, _, _ = ckpt
    llm = LLM(path, limit_mm_per_prompt={"image": 1})
    image = photos()[0]
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate({"prompt": "<image><image>", "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": "<image> twice?", "multi_modal_data": {"image": []}}, GREEDY)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.generate({"prompt": "x", "multi_modal_data": {"audio": [np.zeros(16000)]}}, GREEDY)
    with pytest.raises(ValueError, match="1 x 1 pixels"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": Image.new("RGB", (1, 1))}}, GREEDY)
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    with pytest.raises(ValueError, match="truncated"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": buf.getvalue()[:2000]}}, GREEDY)
    with pytest.raises(ValueError, match="not allowed|disabled|refused"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}],
                 GREEDY)
    out = llm.generate({"prompt": "USER: <image>\nstill fine ASSISTANT:", "multi_modal_data": {"image": image}},
                       GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_NEW


def test_uuid_reuses_an_image_sent_before(ckpt):
    path, _, _ = ckpt
    llm = LLM(path)
    image = photos()[2]
    text = "USER: <image>\nagain ASSISTANT:"
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": "p1"}},
                         GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": None}, "multi_modal_uuids": {"image": "p1"}},
                         GREEDY, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert again.num_cached_tokens > 0
