"""Prompts with audio for decoder-only audio LLMs (Qwen2-Audio, Ultravox, MiniCPM-o): the shared part.

A prompt names each audio with one placeholder token; processing loads the audio, turns it into
`MultiModalItem`s and writes each item's span in its place: the placeholder token once per audio
embedding (MiniCPM-o puts chunk markers between them), so the runner can lay the encoder's outputs
over exactly those positions.

Accepted prompts (as vLLM):
  "text" | {"prompt": "text with placeholders", "multi_modal_data": {"audio": a | [a, ...]},
            "multi_modal_uuids": {"audio": uuid | [uuid, ...]}}
  {"prompt_token_ids": [...], "multi_modal_data": ...}
where each audio `a` is anything `hark.audio.load_audio` reads ((samples, sample_rate), an array
at 16 kHz, encoded bytes, a path), or None together with a uuid sent before with its audio.
With `enable_mm_embeds=True`, {"audio_embeds": tensor [n, hidden] | [B, n, hidden] | list} gives
precomputed LM-space embeddings instead of audio.

Long audio: the encoder sees at most 30 s. A longer clip is split into consecutive 30 s chunks,
each encoded on its own; their embeddings follow one another over the clip's single placeholder.

Sizes are transformers': a clip of L samples has ceil(L / 160) valid mel frames (a last partial
hop counts; hark.audio.mel.valid_frames), chunk k holds min(3000, that - 3000 k) of them, and the
model family turns a chunk's valid frames into its number of embeddings (num_embeds).

Errors a user can cause (placeholders and audios that do not match, too many audios, unknown
uuids, bad embeddings, unreadable media) are ValueErrors raised before anything is scheduled.
"""
import base64
import hashlib
import io
import json
import os
from collections import OrderedDict

import numpy as np
import torch

from hark.audio import AudioLimits, load_audio
from hark.audio.mel import log_mel_spectrogram, valid_frames
from hark.chat import NO_CHAT_TEMPLATE, template_message
from hark.inputs import MultiModalItem, ProcessedPrompt
from hark.media import MediaPolicy, decode_base64_audio, fetch_media, hash_audio
from hark.multimodal.content_parts import AUDIO_KINDS, normalize_part

SAMPLE_RATE = 16000
HOP_LENGTH = 160


class AudioPromptError(ValueError):
    """A prompt's audio does not fit the model or its placeholders."""


def as_prompt_dict(prompt, error: type[ValueError]) -> dict:
    """A prompt as a dict: a string becomes {"prompt": text}; anything but a dict is an error."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise error("a prompt must be a string, {'prompt': str, 'multi_modal_data': ...} "
                    "or {'prompt_token_ids': [...], 'multi_modal_data': ...}.")
    return prompt


def prompt_token_ids(prompt: dict, encode, error: type[ValueError]) -> list[int]:
    """The prompt's token ids: prompt_token_ids as given, or `encode(prompt["prompt"])`."""
    if prompt.get("prompt_token_ids") is not None:
        return [int(t) for t in prompt["prompt_token_ids"]]
    if isinstance(prompt.get("prompt"), str):
        return encode(prompt["prompt"])
    raise error("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'.")


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class NamedAudio:
    """Audio items remembered by their multi_modal_uuids name, LRU under a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, list[MultiModalItem]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(items: list[MultiModalItem]) -> int:
        return sum(i.features.numel() * i.features.element_size() for i in items)

    def get(self, name: str) -> list[MultiModalItem] | None:
        items = self.entries.get(name)
        if items is not None:
            self.entries.move_to_end(name)
        return items

    def put(self, name: str, items: list[MultiModalItem]) -> None:
        if name in self.entries:
            self.bytes -= self._size(self.entries.pop(name))
        size = self._size(items)
        while self.entries and self.bytes + size > self.max_bytes:
            self.bytes -= self._size(self.entries.popitem(last=False)[1])
        if size <= self.max_bytes:
            self.entries[name] = items
            self.bytes += size


class AudioPromptProcessor:
    """The prompt processor of a decoder-only audio LLM. A model family sets:

    chat_placeholder(i): what a chat message holds for its i-th audio (1-based)
    encoder_inputs(samples): [(features the encoder needs, valid mel frames)], one per 30 s chunk
        of a clip (16 kHz), the frames as chunk_frames(len(samples)) counts them
    num_embeds(mel_frames): LM embeddings the encoder yields for that many valid mel frames
    and may set span_token_ids(n): the prompt tokens of an item of n embeddings (default: n audio tokens)
    """
    placeholder_text: str        # the text a prompt writes for one audio
    part_separator = "\n"        # between a chat message's content parts

    def __init__(self, tokenizer, model_path: str, audio_token_id: int, hidden_size: int, n_mels: int,
                 window_frames: int):
        self.tokenizer = tokenizer
        self.model_id = model_path
        self.audio_token_id = audio_token_id
        self.audio_token_text = tokenizer.convert_ids_to_tokens(audio_token_id)
        self.hidden_size = hidden_size
        self.n_mels = n_mels
        self.window_frames = window_frames                     # mel frames in one encoder window
        self.window_samples = window_frames * HOP_LENGTH       # 30 s
        self.chat_template = getattr(tokenizer, "chat_template", None) or read_chat_template(model_path)
        # Engine settings (configure): defaults match EngineConfig's.
        self.limit = None
        self.enable_mm_embeds = False
        self.audio_limits = AudioLimits()
        self.media_policy = MediaPolicy()
        self.named = NamedAudio(512 * 2**20)

    def configure(self, config) -> None:
        """Takes the limits and media policy of an EngineConfig."""
        self.limit = (config.limit_mm_per_prompt or {}).get("audio")
        self.enable_mm_embeds = config.enable_mm_embeds
        self.audio_limits = AudioLimits(max_duration_s=config.max_audio_duration_s)
        self.media_policy = MediaPolicy(allowed_domains=tuple(config.allowed_media_domains),
                                        allowed_local_root=config.allowed_local_media_path)
        self.named = NamedAudio(config.encoder_cache_bytes)

    def window_inputs(self, samples) -> list[tuple[torch.Tensor, int]]:
        """encoder_inputs for encoders that take each 30 s chunk's log-mel cut to its valid frames."""
        inputs = []
        for start in range(0, len(samples), self.window_samples):
            chunk = samples[start: start + self.window_samples]
            features, _ = log_mel_spectrogram([chunk], n_mels=self.n_mels, n_frames=self.window_frames)
            frames = valid_frames(len(chunk))
            inputs.append((features[0, :, :frames].clone(), frames))
        return inputs

    # --- sizes --------------------------------------------------------------------------------
    def audio_tokens(self, duration_s: float) -> int:
        """Prompt tokens a clip of duration_s seconds occupies (all its 30 s chunks)."""
        embeds = (self.num_embeds(f) for f in self.chunk_frames(int(round(duration_s * SAMPLE_RATE))))
        return sum(len(self.span_token_ids(n)) for n in embeds if n)

    def chunk_frames(self, num_samples: int) -> list[int]:
        """Valid mel frames of each 30 s chunk of a clip of num_samples samples."""
        frames = valid_frames(num_samples)
        return [min(self.window_frames, frames - start) for start in range(0, frames, self.window_frames)]

    def span_token_ids(self, num_embeddings: int) -> list[int]:
        """The prompt tokens an item of num_embeddings audio embeddings is written as; its embeddings go
        over the audio tokens among them, in order."""
        return [self.audio_token_id] * num_embeddings

    def item_token_ids(self, item: MultiModalItem) -> list[int]:
        return self.span_token_ids(item.num_embeds if item.is_embed is None else int(item.is_embed.sum()))

    def new_item(self, features, frames: int, key: str, num_embeddings: int, duration_s: float,
                 embeddings: torch.Tensor | None = None) -> MultiModalItem:
        ids = self.span_token_ids(num_embeddings)
        is_embed = None if len(ids) == num_embeddings else torch.tensor(ids) == self.audio_token_id
        return MultiModalItem(features, frames, key, len(ids), duration_s, embeddings=embeddings, is_embed=is_embed)

    # --- prompts ------------------------------------------------------------------------------
    def process(self, prompt: str | dict) -> ProcessedPrompt:
        prompt = as_prompt_dict(prompt, AudioPromptError)
        groups = self._audio_groups(prompt)
        ids = prompt_token_ids(prompt, lambda text: self.tokenizer.encode(self.token_text(text)), AudioPromptError)
        return self._expand(ids, groups, prompt.get("prompt"))

    def token_text(self, text: str) -> str:
        """text with each placeholder written as the audio token the tokenizer knows."""
        return text.replace(self.placeholder_text, self.audio_token_text)

    def _expand(self, ids: list[int], groups: list[list[MultiModalItem]], text: str | None) -> ProcessedPrompt:
        slots = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if len(slots) != len(groups):
            raise AudioPromptError(
                f"the prompt has {len(slots)} audio placeholder(s) ({self.placeholder_text}) but {len(groups)} "
                f"audio(s) were given; write one placeholder per audio in multi_modal_data, and no "
                f"placeholder text without audio.")
        out, items, offsets, prev = [], [], [], 0
        for slot, group in zip(slots, groups):
            out.extend(ids[prev:slot])
            for item in group:
                offsets.append(len(out))
                items.append(item)
                out.extend(self.item_token_ids(item))
            prev = slot + 1
        out.extend(ids[prev:])
        return ProcessedPrompt(out, items, offsets, prompt=text)

    # --- audio --------------------------------------------------------------------------------
    def _audio_groups(self, prompt: dict) -> list[list[MultiModalItem]]:
        """One list of items per audio of the prompt (several for audio longer than 30 s)."""
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, dict):
            raise AudioPromptError("multi_modal_data must be a dict such as {'audio': [(samples, sample_rate)]}.")
        unknown = sorted(set(data) - {"audio", "audio_embeds"})
        if unknown:
            raise AudioPromptError(f"multi_modal_data {unknown} is not supported by this model; it takes 'audio' "
                                   f"(or 'audio_embeds' with enable_mm_embeds=True).")
        audios = data["audio"] if isinstance(data.get("audio"), list) else [data["audio"]] if "audio" in data else []
        embeds = [e for x in as_list(data.get("audio_embeds")) for e in split_embeds(x)]
        if is_embeddings(data.get("audio")):      # vLLM passes embeddings as "audio": tensor [B, n, H] or [[n, H], ...]
            embeds, audios = embeds + [e for x in audios for e in split_embeds(x)], []
        if audios and embeds:
            raise AudioPromptError("a prompt takes either 'audio' or 'audio_embeds', not both.")
        count = len(audios) + len(embeds)
        if self.limit is not None and count > self.limit:
            raise AudioPromptError(f"the prompt has {count} audios; limit_mm_per_prompt allows {self.limit}.")
        if embeds:
            return [[self._embeds_item(e)] for e in embeds]
        uuids = as_list((prompt.get("multi_modal_uuids") or {}).get("audio"))
        if uuids and len(uuids) != len(audios):
            raise AudioPromptError(f"multi_modal_uuids names {len(uuids)} audios but {len(audios)} were given.")
        return [self._audio_group(a, u) for a, u in zip(audios, uuids or [None] * len(audios))]

    def _audio_group(self, audio, uuid) -> list[MultiModalItem]:
        if audio is None:
            if uuid is None:
                raise AudioPromptError("an audio in multi_modal_data is None; pass the audio, or None with the "
                                       "multi_modal_uuids name of audio sent earlier.")
            items = self.named.get(str(uuid))
            if items is None:
                raise AudioPromptError(f"no audio is known under the uuid {uuid!r} (never sent, or evicted); "
                                       f"send the audio again with it.")
            return items
        samples = load_audio(audio, target_sr=SAMPLE_RATE, limits=self.audio_limits)
        items = []
        chunks = self.encoder_inputs(samples)
        name = str(uuid) if uuid is not None else hash_audio(samples, SAMPLE_RATE, self.model_id)
        for k, (features, frames) in enumerate(chunks):
            n = self.num_embeds(frames)
            if n == 0:          # a last chunk of a few ms adds nothing
                continue
            key = name if len(chunks) == 1 else f"{name}#{k}"   # a chunk's features may depend on the whole clip
            seconds = min(self.window_samples, len(samples) - k * self.window_samples) / SAMPLE_RATE
            items.append(self.new_item(features, frames, key, n, seconds))
        if not items:
            raise AudioPromptError(f"the audio is {len(samples) / SAMPLE_RATE * 1000:.0f} ms long, too short to "
                                   f"yield any audio embedding.")
        if uuid is not None:
            self.named.put(str(uuid), items)
        return items

    def _embeds_item(self, embeds) -> MultiModalItem:
        if not self.enable_mm_embeds:
            raise AudioPromptError("audio_embeds are disabled; start the engine with enable_mm_embeds=True.")
        embeds = check_embeds(embeds, self.hidden_size)
        digest = hashlib.blake2b(digest_size=32)
        digest.update(f"embeds\0{embeds.dtype}\0{tuple(embeds.shape)}\0".encode())
        digest.update(embeds.contiguous().view(torch.uint8).numpy().tobytes())
        return self.new_item(torch.empty(0), 0, digest.hexdigest(), embeds.shape[0], 0.0, embeddings=embeds)

    # --- chat ---------------------------------------------------------------------------------
    def build_chat_prompt(self, conversation: list[dict], chat_template: str | None, add_generation_prompt: bool,
                          template_kwargs: dict) -> dict:
        """OpenAI-style messages -> a prompt dict for process(). Content parts: text, input_audio
        ({"data": base64, "format": ...}), audio_url ({"url": data:/file:/http(s)}), audio_embeds;
        an audio part may carry "uuid" (and omit its media if that uuid was sent before)."""
        audios, uuids, embeds, messages = [], [], [], []
        for message in conversation:
            content = message.get("content")
            if content is None or isinstance(content, str):
                messages.append(template_message(message, content or ""))
                continue
            pieces = []
            for part in map(normalize_part, content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(part.get("text", ""))
                    continue
                if kind in AUDIO_KINDS:
                    audios.append(read_audio_part(part, self.media_policy))
                    uuids.append(part.get("uuid"))
                elif kind == "audio_embeds":
                    embeds.append(read_embeds_part(part))
                else:
                    raise AudioPromptError(f"content part {_describe(part)} is not supported; use text, input_audio, "
                                           f"audio_url, audio or audio_embeds.")
                pieces.append(self.chat_placeholder(len(audios) + len(embeds)))
            messages.append(template_message(message, self.part_separator.join(pieces)))
        template = chat_template or self.chat_template
        if template is None:
            raise AudioPromptError(NO_CHAT_TEMPLATE)
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **template_kwargs)
        prompt = {"prompt_token_ids": self.tokenizer.encode(self.token_text(text), add_special_tokens=False),
                  "prompt": text, "multi_modal_data": {}}
        if audios:
            prompt["multi_modal_data"]["audio"] = audios
            if any(u is not None for u in uuids):
                prompt["multi_modal_uuids"] = {"audio": uuids}
        if embeds:
            prompt["multi_modal_data"]["audio_embeds"] = embeds
        return prompt


def read_chat_template(model_path: str) -> str | None:
    """The processor's chat template (chat_template.jinja / chat_template.json) when the tokenizer has none."""
    jinja = os.path.join(model_path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    path = os.path.join(model_path, "chat_template.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("chat_template")
    return None


def _describe(part) -> str:
    if isinstance(part, dict) and part.get("type") is not None:
        return f"type {part['type']!r}"
    keys = sorted(part) if isinstance(part, dict) else []
    return f"with keys {keys} and no type" if keys else repr(part)


def read_audio_part(part: dict, policy: MediaPolicy):
    """The audio of an input_audio / audio_url / audio part: encoded bytes, or the samples an audio part
    holds (None: a uuid reference without media)."""
    kind = part["type"]
    spec = part.get(kind)
    if spec is None:
        if part.get("uuid") is None:
            raise AudioPromptError(f"a {kind} content part needs its '{kind}' field.")
        return None
    if kind == "audio":
        return spec         # samples, (samples, rate) or bytes: load_audio reads them
    if kind == "input_audio":
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise AudioPromptError("input_audio must be {'data': <base64 audio>, 'format': 'wav' | 'mp3' | ...}.")
        return decode_base64_audio(spec["data"], policy.max_bytes)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise AudioPromptError("audio_url must be {'url': 'data:...' | 'file:...' | 'https://...'}.")
    return fetch_media(url, policy)


def read_embeds_part(part: dict):
    """audio_embeds: a tensor, or base64 of torch.save(tensor) as vLLM's clients send."""
    value = part.get("audio_embeds")
    if not isinstance(value, str):
        return value
    try:
        return torch.load(io.BytesIO(base64.b64decode(value, validate=True)), map_location="cpu", weights_only=True)
    except Exception:      # bad base64, not a torch.save file, or anything weights_only refuses
        raise AudioPromptError("audio_embeds must be a tensor, or base64 of a tensor saved with torch.save.") from None


def is_embeddings(audio) -> bool:
    """vLLM's rule: a 3-D torch tensor, or a list of 2-D torch tensors, is embeddings, not samples."""
    if isinstance(audio, torch.Tensor):
        return audio.ndim == 3
    return isinstance(audio, list) and bool(audio) and all(isinstance(a, torch.Tensor) and a.ndim == 2 for a in audio)


def split_embeds(value) -> list:
    """[n, H] -> one item; [B, n, H] -> B items."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor) and value.ndim == 3:
        return list(value.unbind(0))
    return [value]


def check_embeds(embeds, hidden_size: int) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor):
        raise AudioPromptError(f"audio_embeds must be a torch tensor [num_embeds, {hidden_size}], "
                               f"not {type(embeds).__name__}.")
    if embeds.ndim != 2 or embeds.shape[0] == 0 or embeds.shape[1] != hidden_size:
        raise AudioPromptError(f"audio_embeds must have shape [num_embeds >= 1, {hidden_size}] (the model's hidden "
                               f"size), got {list(embeds.shape)}.")
    if embeds.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AudioPromptError(f"audio_embeds must be float32, float16 or bfloat16, got {embeds.dtype}.")
    embeds = embeds.detach().cpu()
    if not torch.isfinite(embeds).all():
        raise AudioPromptError("audio_embeds contain NaN or infinite values.")
    return embeds
