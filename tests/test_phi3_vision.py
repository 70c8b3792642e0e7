"""Phi-3.5-vision (`Phi3VForCausalLM`, remote code) on hark against a composed reference, on a tiny random
checkpoint written in the remote layout (config.json keys and weight names) with real photos of three
shapes: 0, 1 and 2 images per prompt, batched.

The remote code cannot be loaded (no hub, and its processor needs torchvision), so the reference is
composed: transformers' CLIPVisionModel and Phi3ForCausalLM (LongRoPE) for the parts transformers has,
and below, transcribed from Microsoft's processing_phi3_v.py / image_embedding_phi3_v.py, the image
processor (torchvision's PIL resize / pad / ToTensor / Normalize written with PIL and torch), the
prompt ids (negative ids -k for image k) and the HD feature glue, fed to Phi3ForCausalLM.generate as
inputs_embeds. None of it calls hark.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hark import LLM, SamplingParams
from conftest import image_data_url, make_byte_tokenizer, randomize

IMAGES = os.path.join(os.path.dirname(__file__), "data")     # photos of ../shared/images
MAX_NEW = 8
NUM_CROPS = 4                   # Phi-3.5-vision-instruct's preprocessor_config.json
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# Phi-3.5-vision-instruct's chat template
TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
            "{{- '<|assistant|>\n' -}}{% endif %}")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
              patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def photos():
    """Square (512 x 512: 2 x 2 crops), wide (741 x 500: 2 x 2 after white padding) and tall (a 300 x 700 crop of
    the Hubble deep field: transposed, 2 rows x 1 column)."""
    astronaut = Image.open(os.path.join(IMAGES, "astronaut.png")).convert("RGB")
    motorcycle = Image.open(os.path.join(IMAGES, "motorcycle_left.png")).convert("RGB")
    hubble = Image.open(os.path.join(IMAGES, "hubble_deep_field.jpg")).convert("RGB").crop((100, 50, 400, 750))
    return [astronaut, motorcycle, hubble]


def make_tokenizer(path: str):
    """The tests' byte-level tokenizer with Phi-3's special tokens and a BOS on every encode (as Phi-3's Llama
    tokenizer adds one), so the processor's piecewise tokenization shows."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer
    tok = make_byte_tokenizer(path, ["<s>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>"], TEMPLATE)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.bos_token = "<s>"
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def make_tiny_phi3v(path: str, vision: dict = VISION, lm_size: dict = TINY_LM, stds=(0.2, 0.1, 0.1)):
    """Writes config.json (the real keys), preprocessor_config.json and model.safetensors (the remote weight
    names) of a small random Phi3VForCausalLM; returns the reference parts (CLIP tower, glue, LM) and the
    tokenizer. stds: the LM's, the tower's and the glue's weights (LM 0.2: answers that vary)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM
    tok = make_tokenizer(path)
    hidden, dim = lm_size["hidden_size"], 4 * vision["hidden_size"]
    rotary_half = hidden // lm_size["num_attention_heads"] // 2
    lm_config = dict(vocab_size=len(tok), **lm_size, max_position_embeddings=8192,
                     original_max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu",
                     rope_theta=10000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.eos_token_id, tie_word_embeddings=False, sliding_window=262144,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                                   "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)]})
    torch.manual_seed(0)
    lm = Phi3ForCausalLM(Phi3Config(**lm_config))
    clip = CLIPVisionModel(CLIPVisionConfig(**vision))
    glue = torch.nn.ModuleDict({"img_projection": torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))})
    glue.glb_GN = torch.nn.Parameter(torch.empty(1, 1, dim))
    glue.sub_GN = torch.nn.Parameter(torch.empty(1, 1, 1, dim))
    for i, (part, std) in enumerate(zip((lm, clip, glue), stds)):
        randomize(part, std=std, seed=i)
        part.eval()
    weights = {name: t for name, t in lm.state_dict().items()}
    weights.update({f"model.vision_embed_tokens.img_processor.{n}": t for n, t in clip.state_dict().items()})
    weights.update({f"model.vision_embed_tokens.{n}": t for n, t in glue.state_dict().items()})
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"]
    save_file({n: t.contiguous().clone() for n, t in weights.items()}, os.path.join(path, "model.safetensors"))
    config = dict(lm_config, architectures=["Phi3VForCausalLM"], model_type="phi3_v", torch_dtype="float32",
                  auto_map={"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
                  embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                              "use_hd_transform": True, "with_learnable_separator": True},
                  img_processor={"image_dim_out": vision["hidden_size"], "model_name": "openai/clip-vit-large-patch14-336",
                                 "name": "clip_vision_model", "num_img_tokens": 144, "vision_config": vision},
                  embd_pdrop=0.0, resid_pdrop=0.0, attention_dropout=0.0, _attn_implementation="flash_attention_2")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"auto_map": {"AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
                   "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_processor_type": "Phi3VImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "num_crops": NUM_CROPS, "num_img_tokens": 144, "processor_class": "Phi3VProcessor"}, f)
    return clip, glue, lm, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("phi3v"))
    return path, *make_tiny_phi3v(path)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt[0], max_num_batched_tokens=512)     # chunked prefill cuts through the images


# --- the reference: the remote processor and image embedding, transcribed --------------------------------
def ref_hd_transform(img, hd_num):
    """image_processing_phi3_v.HD_transform (torchvision's PIL resize = PIL bilinear; its pad = ImageOps.expand)."""
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    tar = int(np.ceil(new_h / 336) * 336)
    top_padding = int((tar - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top_padding, 0, tar - new_h - top_padding), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return img


def ref_preprocess(images, num_crops=NUM_CROPS):
    """Phi3VImageProcessor.preprocess: pixel_values [n, num_crops + 1, 3, 336, 336], image_sizes, num_img_tokens."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    elems = [ref_hd_transform(im.convert("RGB"), num_crops) for im in images]
    hd_images = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).sub(mean).div(std) for im in elems]
    global_image = [torch.nn.functional.interpolate(im.unsqueeze(0).float(), size=(336, 336), mode="bicubic")
                    for im in hd_images]
    shapes = [[im.size(1), im.size(2)] for im in hd_images]
    num_img_tokens = [int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12) for h, w in shapes]
    reshaped = [im.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
                for im, (h, w) in zip(hd_images, shapes)]
    crops = [torch.cat([g, r], dim=0) for g, r in zip(global_image, reshaped)]
    padded = [torch.cat([c, torch.zeros(num_crops + 1 - c.shape[0], 3, 336, 336)]) for c in crops]
    return torch.stack(padded), shapes, num_img_tokens


def ref_input_ids(tok, text, num_img_tokens):
    """Phi3VProcessor._convert_images_texts_to_inputs: each text piece tokenized on its own, -k for image k."""

    if not num_img_tokens:
        return tok(text).input_ids
    pattern = r"<\|image_\d+\|>"
    chunks = [tok(chunk).input_ids for chunk in re.split(pattern, text)]
    image_ids = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(pattern, text)]
    pads = [[-iid] * num_img_tokens[iid - 1] for iid in image_ids] + [[]]
    return [t for chunk, pad in zip(chunks, pads) for t in chunk + pad]


def ref_image_embeds(clip, glue, pixel_values, image_sizes, order="sub_glb"):
    """Phi3ImageEmbedding: the CLIP tower's hidden_states[-2] without CLS, then hd_feature_transform."""
    n, crops = pixel_values.shape[:2]
    feats = clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = feats.reshape(n, crops, -1, feats.shape[-1])

    def merge(x, h_crop, w_crop):
        N, L, C = x.shape
        H = int(L ** 0.5)
        return (x.reshape(N, H, H, C).reshape(N, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
                .reshape(N, -1, 4 * C).reshape(N // (h_crop * w_crop), h_crop, w_crop, H // 2, H // 2, -1)
                .permute(0, 1, 3, 2, 4, 5).reshape(N // (h_crop * w_crop), h_crop * H // 2, w_crop * H // 2, 4 * C))

    def newline(x):
        num, h, w, d = x.shape
        return torch.cat([x, glue.sub_GN.expand(num, h, -1, -1)], dim=2).reshape(num, -1, d)

    glb = newline(merge(feats[:, 0], 1, 1))
    parts = []
    for i, (h, w) in enumerate(image_sizes):
        sub = newline(merge(feats[i, 1:1 + (h // 336) * (w // 336)], h // 336, w // 336)).squeeze(0)
        parts += [sub, glue.glb_GN.squeeze(0), glb[i]] if order == "sub_glb" else [glue.glb_GN.squeeze(0), glb[i], sub]
    return glue.img_projection(torch.cat(parts))


def ref_inputs_embeds(clip, glue, lm, tok, text: str, images: list) -> torch.Tensor:
    """[L, H]: the remote Phi3VModel's inputs_embeds (image features where the ids are negative)."""
    with torch.no_grad():
        pixels, sizes, counts = ref_preprocess(images) if images else (None, [], [])
        ids = torch.tensor(ref_input_ids(tok, text, counts))
        embeds = lm.model.embed_tokens(ids.clamp_min(0))
        if images:
            embeds[ids < 0] = ref_image_embeds(clip, glue, pixels, sizes)
    return embeds


def reference(ckpt, text: str, images: list) -> list[int]:
    _, clip, glue, lm, tok = ckpt
    embeds = ref_inputs_embeds(clip, glue, lm, tok, text, images)[None]
    with torch.no_grad():
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0].tolist()


def prompt(question: str, count: int) -> str:
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, count + 1))
    return f"<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


CASES = [
    (prompt("no image, just text", 0), []),
    (prompt("What is in this image?", 1), [0]),
    (prompt("What is in these images?", 2), [1, 2]),
    (prompt("And this one?", 1), [2]),
    (prompt("The astronaut again: what is it?", 1), [0]),
]


# --- tests -----------------------------------------------------------------------------------------------
def test_pixels_and_token_counts_equal_the_remote_processor(llm):
    processor = llm.llm_engine.processor
    for image in photos():
        pixels, counts = ref_preprocess([image])[0][0], ref_preprocess([image])[2][0]
        features, num_embeds, grid = processor.image_item_inputs(image)
        assert num_embeds == counts
        assert torch.equal(features, pixels[:features.shape[0]])
        assert not pixels[features.shape[0]:].any()          # the remote padding crops hold nothing
    assert [processor.image_item_inputs(i)[1:] for i in photos()] == [(757, (1, 2, 2)), (757, (1, 2, 2)),
                                                                      (469, (1, 2, 1))]


def test_prompt_ids_equal_the_remote_processor(llm, ckpt):
    tok, processor = ckpt[4], llm.llm_engine.processor
    images = photos()
    for text, idx in CASES:
        counts = [processor.image_item_inputs(images[i])[1] for i in idx]
        got = processor.process({"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}})
        expected = [t if t >= 0 else processor.image_token_id for t in ref_input_ids(tok, text, counts)]
        assert got.prompt_token_ids == expected
        assert expected.count(tok.bos_token_id) == 1 + len(idx)      # one BOS per text piece, as the remote


def test_vision_features_close_to_the_reference(llm, ckpt):
    _, clip, glue, _, _ = ckpt
    model, processor = llm.llm_engine.executor.model, llm.llm_engine.processor
    images = photos()
    items = [processor.process({"prompt": prompt("x", 1), "multi_modal_data": {"image": im}}).mm_items[0]
             for im in images]
    with torch.no_grad():
        got = model.embed_multimodal(items)
        pixels, sizes, _ = ref_preprocess(images)
        expected = ref_image_embeds(clip, glue, pixels, sizes).split([i.num_embeds for i in items])
        mutated = ref_image_embeds(clip, glue, pixels, sizes, order="glb_sub").split([i.num_embeds for i in items])
    for g, e, m in zip(got, expected, mutated):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() < 1e-5
        assert (g - m).abs().max().item() > 1e-2      # the comparison sees the separators' placement


def test_greedy_matches_the_reference_batched(llm, ckpt):
    images = photos()
    prompts = [{"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}} if idx else text
               for text, idx in CASES]
    before = llm.llm_engine.executor.runner.encoder_items
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(ckpt, text, [images[i] for i in idx]) for text, idx in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len(outs[2].prompt_token_ids) > 757 + 469
    assert llm.llm_engine.executor.runner.encoder_items - before == 3        # each photo encoded once (the astronaut twice asked)


def test_separator_mutation_changes_the_answer(ckpt):
    """The parity test can fail: hark with sub_GN before each row instead of after does not match."""
    from hark.models import phi3_vision
    images = photos()
    text, idx = CASES[2]
    original = phi3_vision.Phi3ImageEmbedding.with_row_ends

    def row_starts(self, grid):
        return torch.cat([self.sub_GN[0].expand(grid.shape[0], 1, -1), grid], dim=1).flatten(0, 1)
    phi3_vision.Phi3ImageEmbedding.with_row_ends = row_starts
    try:
        llm = LLM(ckpt[0], enable_prefix_caching=False)
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": [images[i] for i in idx]}}, GREEDY,
                           use_tqdm=False)[0]
    finally:
        phi3_vision.Phi3ImageEmbedding.with_row_ends = original
    assert out.outputs[0].token_ids != reference(ckpt, text, [images[i] for i in idx])


def test_tags_name_their_images(llm, ckpt):
    """`<|image_2|>` before `<|image_1|>` puts the second image first (vLLM's reading of the tags)."""
    images = photos()
    swapped = llm.generate({"prompt": "<|user|>\n<|image_2|>\n<|image_1|>\nwhich?<|end|>\n<|assistant|>\n",
                            "multi_modal_data": {"image": [images[2], images[1]]}}, GREEDY, use_tqdm=False)[0]
    assert swapped.outputs[0].token_ids == reference(ckpt, prompt("which?", 2), [images[1], images[2]])




def test_chat_numbers_the_images(llm, ckpt):
    images = photos()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(images[0])}},
        {"type": "image_url", "image_url": {"url": image_data_url(images[2])}},
        {"type": "text", "text": "What is in these images?"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is in these images?<|end|>\n<|assistant|>\n"
    assert out.prompt == text
    assert out.outputs[0].token_ids == reference(ckpt, text, [images[0], images[2]])


def test_prefix_cache_reuses_an_image_question(llm):
    image = photos()[1]
    first = llm.generate({"prompt": prompt("Colours?", 1), "multi_modal_data": {"image": image}}, GREEDY,
                         use_tqdm=False)[0]
    again = llm.generate({"prompt": prompt("Colours?", 1), "multi_modal_data": {"image": image}}, GREEDY,
                         use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens >= 757
    other = ImageOps.mirror(image)      # unseen: same token count, other pixels, so only the text before it is reused
    third = llm.generate({"prompt": prompt("Colours?", 1), "multi_modal_data": {"image": other}}, GREEDY,
                         use_tqdm=False)[0]
    assert third.num_cached_tokens < 16


def test_bad_prompts(llm):
    image = photos()[0]
    with pytest.raises(ValueError, match="must name each"):
        llm.generate({"prompt": "<|image_1|><|image_3|>", "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(ValueError, match="must name each"):
        llm.generate({"prompt": "<|image_1|><|image_1|>", "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": "<|image_1|> where?", "multi_modal_data": {}}, GREEDY)
    with pytest.raises(ValueError, match=re.escape("<|image_1|>")):
        llm.generate({"prompt": "<|image|> where?", "multi_modal_data": {"image": image}}, GREEDY)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.generate({"prompt": "x", "multi_modal_data": {"audio": [np.zeros(16000)]}}, GREEDY)
    out = llm.generate({"prompt": prompt("still fine", 1), "multi_modal_data": {"image": image}}, GREEDY,
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_NEW


def ref_num_tokens_from_size(width, height, hd_num):
    """Phi3VImageProcessor.calc_num_image_tokens_from_image_size (calc_hd_transform_size, calc_padded_size)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(np.ceil(int(new_w / ratio) / 336) * 336)
    if transposed:
        new_w, new_h = new_h, new_w
    return int((new_h // 336 * new_w // 336 + 1) * 144 + 1 + (new_h // 336 + 1) * 12)


def test_token_counts_over_many_shapes(llm):
    from hark.multimodal.phi3_vision import hd_transform
    processor = llm.llm_engine.processor
    for width, height in [(1, 1), (20, 900), (336, 336), (337, 336), (640, 480), (480, 640), (1000, 200), (200, 1000),
                          (1920, 1080), (700, 701), (3000, 400)]:
        for num_crops in (1, 4, 16):
            hd = hd_transform(Image.new("RGB", (width, height)), num_crops)
            rows, cols = hd.height // 336, hd.width // 336
            assert rows * cols <= num_crops
            assert processor.num_image_tokens(rows, cols) == ref_num_tokens_from_size(width, height, num_crops)


def test_reads_the_published_config():
    """Phi-3.5-vision-instruct's config.json (the factor lists shortened to placeholders of the right length)."""
    from hark.models.phi3_vision import read_config
    from hark.models.phi4_multimodal import context_limit
    raw = {"architectures": ["Phi3VForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
           "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                          "use_hd_transform": True, "with_learnable_separator": True},
           "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 3072,
           "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                             "name": "clip_vision_model", "num_img_tokens": 144},
           "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
           "model_type": "phi3_v", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
           "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
           "rope_scaling": {"long_factor": [1.5] * 48, "short_factor": [1.0] * 48, "type": "su"},
           "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "transformers_version": "4.38.1", "use_cache": True, "vocab_size": 32064,
           "_attn_implementation": "flash_attention_2"}
    config = read_config("phi", raw)
    assert config.rope_parameters["rope_type"] == "longrope" and context_limit(config) == 4096
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert config.architectures == ["Phi3VForCausalLM"]
    with pytest.raises(ValueError, match="embd_layer"):
        read_config("phi", dict(raw, embd_layer=dict(raw["embd_layer"], hd_transform_order="glb_sub")))
    with pytest.raises(ValueError, match="image_dim_out"):
        read_config("phi", dict(raw, img_processor=dict(raw["img_processor"], image_dim_out=768)))


def test_served_chat_matches_offline(llm):
    import httpx
    import openai
    from hark.engine.async_engine import AsyncLLMEngine
    from hark.server.app import BackgroundServer, build_app
    from hark.server.metrics import Metrics
    from hark.server.state import ServedModel
    images = photos()
    content = [{"type": "image_url", "image_url": {"url": image_data_url(images[1])}},
               {"type": "image_url", "image_url": {"url": image_data_url(images[2])}},
               {"type": "text", "text": "Compare them."}]
    offline = llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)[0]
    metrics = Metrics()
    with BackgroundServer(build_app([ServedModel("phi3v", AsyncLLMEngine(llm.llm_engine), metrics)], metrics)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="phi3v", messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=MAX_NEW)
        assert r.choices[0].message.content == offline.outputs[0].text
        assert r.usage.prompt_tokens == len(offline.prompt_token_ids) > 757 + 469
        bad = httpx.post(url + "/v1/completions", timeout=60,
                         json={"model": "phi3v", "prompt": "<|image_1|> what?", "max_tokens": 4})
        assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]


def test_image_embeds_stand_for_the_image(ckpt):
    llm = LLM(ckpt[0], enable_mm_embeds=True)
    image, text = photos()[2], prompt("What is it?", 1)
    item = llm.llm_engine.processor.process({"prompt": text, "multi_modal_data": {"image": image}}).mm_items[0]
    with torch.no_grad():
        embeds = llm.llm_engine.executor.model.embed_multimodal([item])[0]
    by_embeds = llm.generate({"prompt": text, "multi_modal_data": {"image_embeds": embeds}}, GREEDY, use_tqdm=False)[0]
    assert by_embeds.outputs[0].token_ids == reference(ckpt, text, [image])
