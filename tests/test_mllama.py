"""Llama 3.2 Vision (mllama) on hark: greedy parity with transformers on a tiny random checkpoint with real photos
(0, 1 and 2 images per prompt, consecutive and apart, text before the first image, batched, chunked prefill),
implicit and explicit (encoder / decoder) prompts, vision outputs and logits, the cross-attention mask
(a wrong one must fail), chat with image_url parts, caches and errors."""
import os

import pytest
import torch
from PIL import Image

from hark import LLM, SamplingParams
from conftest import image_data_url, make_byte_tokenizer, randomize

DATA = os.path.join(os.path.dirname(__file__), "data")
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
TILE = 28
# Llama-3.2-11B-Vision-Instruct's template, shortened: bos, header, the content parts in order
TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def photos():
    """Real photos (scikit-image's data) cut to four canvases of 28-px tiles: the astronaut (2 x 2 tiles), a wide
    strip of the Hubble deep field (1 x 4), a tall one (3 x 1) and a small patch (1 x 1, three padding tiles)."""
    astronaut = Image.open(os.path.join(DATA, "astronaut_160.jpg")).convert("RGB")
    hubble = Image.open(os.path.join(DATA, "hubble_deep_field.jpg")).convert("RGB")
    return [astronaut, hubble.crop((0, 300, 400, 400)), hubble.crop((600, 100, 700, 350)),
            hubble.crop((500, 500, 524, 520))]


def make_tiny_mllama(path: str):
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    tok = make_byte_tokenizer(path, ["<|begin_of_text|>", "<|image|>"], TEMPLATE)
    tok.bos_token = "<|begin_of_text|>"
    tok.save_pretrained(path)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                  image_size=TILE, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
                  vision_output_dim=32 * 3)
    # as Llama 3.2: <|image|> is the first id past vocab_size (an embedding row the LM head cannot produce)
    text = dict(vocab_size=image_id, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=512,
                rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 128, "rope_theta": 500000.0},
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          architectures=["MllamaForConditionalGeneration"])
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    randomize(model, std=0.2)             # wide enough that the images (and which are seen) steer the tokens
    model.eval()
    model.save_pretrained(path)
    MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4).save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mllama"))
    return path, *make_tiny_mllama(path)


def hf_processor(path, tok):
    from transformers import AutoImageProcessor, MllamaProcessor
    return MllamaProcessor(AutoImageProcessor.from_pretrained(path), tok)


def reference(path, model, tok, text: str, images: list) -> list[int]:
    """transformers' own processor and model, one prompt at a time."""
    inputs = hf_processor(path, tok)(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


CASES = [
    ("no image, just text", []),
    ("<|image|>what is in it?", [0]),
    ("look: <|image|> first, then <|image|> which is the sky?", [1, 2]),     # text before, images apart
    ("<|image|><|image|>two at once, then words", [3, 0]),                    # one group of two
    ("<|image|>the astronaut again", [0]),
]


def test_greedy_matches_transformers(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path, max_num_batched_tokens=16)          # chunked prefill cuts through the segments
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} if idx else text
               for text, idx in CASES]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(path, model, tok, text, [images[i] for i in idx]) for text, idx in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[2].prompt_token_ids == hf_processor(path, tok)(text=CASES[2][0], images=[images[1], images[2]])[
        "input_ids"][0]                                  # <|image|> stays one token each, bos as transformers adds it
    assert outs[2].encoder_prompt_token_ids == [tok.convert_tokens_to_ids("<|image|>")] * 2
    assert llm.llm_engine.stats()["encoder_items"] == 4      # the astronaut is encoded once for three prompts


def test_explicit_and_implicit_prompts_agree(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path)
    decoder = "<|image|><|begin_of_text|>Please describe the image."
    implicit = {"prompt": decoder, "multi_modal_data": {"image": images[1]}}
    explicit = {"encoder_prompt": {"prompt": "<|image|>", "multi_modal_data": {"image": images[1]}},
                "decoder_prompt": decoder}
    as_ids = {"encoder_prompt": {"prompt": "", "multi_modal_data": {"image": [images[1]]}},
              "decoder_prompt": tok.encode(decoder)}
    outs = llm.generate([implicit, explicit, as_ids], GREEDY, use_tqdm=False)
    expected = reference(path, model, tok, decoder, [images[1]])
    assert [o.outputs[0].token_ids for o in outs] == [expected] * 3


def test_vision_outputs_and_logits_close_to_transformers(ckpt):
    path, model, tok = ckpt
    images = photos()
    text = "see <|image|> and <|image|> now describe"
    llm = LLM(path)
    processor = llm.llm_engine.processor
    items = processor.process({"prompt": text, "multi_modal_data": {"image": images[2:4]}}).mm_items
    ours = llm.llm_engine.executor.model.embed_multimodal(items)
    inputs = hf_processor(path, tok)(text=text, images=images[2:4], return_tensors="pt")
    with torch.no_grad():
        states = model.model.vision_model(inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                          inputs["aspect_ratio_mask"]).last_hidden_state
        theirs = model.model.multi_modal_projector(states)[0].flatten(1, 2)      # [images, tiles * tokens, H]
        logits = model(**inputs).logits[0]
    assert all(torch.equal(item.features, inputs["pixel_values"][0, i]) for i, item in enumerate(items))
    for i in range(2):
        assert (ours[i] - theirs[i]).abs().max() < 1e-5
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images[2:4]}},
                       SamplingParams(temperature=0.0, max_tokens=1, logprobs=5, prompt_logprobs=3), use_tqdm=False)[0]
    ref = torch.log_softmax(logits.float(), -1)
    ids, image_id = out.prompt_token_ids, tok.convert_tokens_to_ids("<|image|>")
    worst = max(abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item())
                for pos, entry in enumerate(out.prompt_logprobs[1:], start=1) if ids[pos] != image_id)
    assert all(entry[image_id].logprob == float("-inf")     # past the LM head: it can never be sampled
               for pos, entry in enumerate(out.prompt_logprobs[1:], start=1) if ids[pos] == image_id)
    for token, logprob in out.outputs[0].logprobs[0].items():
        worst = max(worst, abs(logprob.logprob - ref[-1, token].item()))
    assert worst < 1e-4


def test_a_wrong_cross_attention_mask_changes_the_tokens(ckpt, monkeypatch):
    """The mask matters: letting every token see every image (or the images' padding tiles) changes the
    output of a prompt whose images are seen apart, so the parity test above can fail."""
    import hark.models.mllama as mllama
    path, model, tok = ckpt
    images = photos()
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} for text, idx in CASES[2:4]]
    expected = [reference(path, model, tok, text, [images[i] for i in idx]) for text, idx in CASES[2:4]]

    def generated():
        return [o.outputs[0].token_ids for o in LLM(path).generate(prompts, GREEDY, use_tqdm=False)]
    assert generated() == expected
    right = mllama.image_segments
    monkeypatch.setattr(mllama, "attended_spans", lambda offsets, length: [(offsets[0], length)] * len(offsets))
    assert generated()[0] != expected[0]                                             # both images seen together
    monkeypatch.undo()
    monkeypatch.setattr(mllama, "image_segments", lambda offsets, length, tiles, tokens, max_tiles: right(
        offsets, length, [max_tiles] * len(tiles), tokens, max_tiles))               # padding tiles seen too
    assert generated()[1] != expected[1]




def test_chat_with_image_url_parts(ckpt):
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(images[0])}},
        {"type": "text", "text": "which is the sky?"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = "<|begin_of_text|><|im_start|>user\n<|image|>which is the sky?<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == text
    assert out.outputs[0].token_ids == reference(path, model, tok, text, [images[0]])


def test_prefix_cache_keeps_images_apart(ckpt):
    """The same text with another image reuses no KV (every token sees the images); the same image does."""
    path, model, tok = ckpt
    images = photos()
    llm = LLM(path)
    text = "a long question about this picture, long enough to fill blocks: <|image|> what is it?"
    first, other, again = (llm.generate({"prompt": text, "multi_modal_data": {"image": images[i]}}, GREEDY,
                                        use_tqdm=False)[0] for i in (1, 2, 1))
    assert other.num_cached_tokens == 0
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert other.outputs[0].token_ids == reference(path, model, tok, text, [images[2]])


def test_errors(ckpt):
    path, _, _ = ckpt
    image = photos()[0]
    llm = LLM(path, limit_mm_per_prompt={"image": 1}, enable_mm_embeds=True)
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate({"prompt": "<|image|><|image|>", "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": "<|image|> twice?", "multi_modal_data": {"image": []}}, GREEDY)
    with pytest.raises(ValueError, match="only images"):
        llm.generate({"encoder_prompt": {"prompt": "text", "multi_modal_data": {"image": image}},
                      "decoder_prompt": "<|image|>x"}, GREEDY)
    with pytest.raises(ValueError, match="needs a decoder_prompt"):
        llm.generate({"encoder_prompt": {"prompt": "<|image|>", "multi_modal_data": {"image": image}}}, GREEDY)
    with pytest.raises(ValueError, match="0 image placeholder"):
        llm.generate({"encoder_prompt": {"multi_modal_data": {"image": image}}, "decoder_prompt": "no image"}, GREEDY)
    with pytest.raises(ValueError, match="not supported for mllama"):
        llm.generate({"prompt": "<|image|>", "multi_modal_data": {"image_embeds": torch.zeros(4, 64)}}, GREEDY)
    out = llm.generate({"prompt": "<|image|>still fine", "multi_modal_data": {"image": image}}, GREEDY,
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_NEW


@pytest.mark.parametrize("offsets", [[0], [3], [0, 1], [2, 5], [2, 3, 7], [0, 1, 2], [4, 5, 9, 10], [11], [5, 11]])
def test_segments_follow_transformers_cross_attention_mask(offsets):
    """Every prompt position sees exactly the (image, tile) pairs transformers' processor mask gives it."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                               get_cross_attention_token_mask)
    from hark.models.mllama import image_segments
    length, max_tiles, tokens, image_id = 12, 4, 3, 99
    tiles = [1 + (3 * i) % max_tiles for i in range(len(offsets))]
    ids = [image_id if p in offsets else 7 for p in range(length)]
    dense = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, image_id)], [tiles],
                                                         max_tiles, length)[0]          # [length, images, tiles]
    segments = image_segments(offsets, length, tiles, tokens, max_tiles)
    assert segments[0].start == 0 and segments[-1].end is None
    for pos in range(length):
        seg = next(s for s in segments if s.start <= pos and (s.end is None or pos < s.end))
        expected = torch.tensor(dense[pos]).repeat_interleave(tokens, dim=1).flatten().nonzero()[:, 0]
        if len(expected):
            assert torch.equal(seg.keys, expected)
        else:
            assert seg.keys is None                   # sees no image: attends all of them, its MLP dropped


def test_preemption_and_samples_keep_their_images(ckpt):
    """A KV cache too small for the batch preempts and recomputes requests (their cross-attention K/V stay with
    the request); n > 1 samples and beams of one request share them."""
    from hark import BeamSearchParams
    path, _, _ = ckpt
    images = photos()
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} if idx else text
               for text, idx in CASES]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, params, use_tqdm=False)]
    small = LLM(path, num_kv_blocks=12, block_size=8, max_model_len=96)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)] == expected
    assert small.llm_engine.stats()["num_preemptions"] > 0
    greedy_n = small.generate(prompts[2], SamplingParams(temperature=0.0, n=2, max_tokens=12, ignore_eos=True),
                              use_tqdm=False)[0]
    assert [c.token_ids for c in greedy_n.outputs] == [expected[2]] * 2
    beams = small.beam_search([prompts[2]], BeamSearchParams(beam_width=3, max_tokens=4))[0].sequences
    assert len(beams) == 3
