"""`hark serve`: load the model(s), wrap each engine in an AsyncLLMEngine and run the app under uvicorn."""
import json
import logging

from hark.chat import chat_template_option
from hark.cli import vllm_engine_flags
from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.lora.request import LoRARequest
from hark.media import MediaPolicy
from hark.server.app import build_app, run_server
from hark.server.lora import LoRAModule
from hark.server.metrics import Metrics
from hark.server.state import ServedModel

DEFAULT_MODEL_NAME = "whisper-tiny.en"
WHISPER_ALIAS = "whisper-1"      # OpenAI's name for its Whisper model: clients written for OpenAI send it


def _limit_mm(value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        limits = json.loads(value)
    except json.JSONDecodeError:
        limits = None
    if not isinstance(limits, dict) or not all(isinstance(v, int) and v >= 0 for v in limits.values()):
        raise ValueError(f"--limit-mm-per-prompt takes JSON such as '{{\"audio\": 2}}', got {value!r}")
    return limits


def media_policy(args) -> MediaPolicy:
    return MediaPolicy(allowed_domains=tuple(args.allowed_media_domains or ()),
                       allow_private_addresses=args.allow_private_media_addresses,
                       allowed_local_root=args.allowed_local_media_path)


def load_served_model(model: str | None, names: list[str], engine_args: dict, args, metrics: Metrics,
                      policy: MediaPolicy, lora_modules: list[LoRAModule] = ()) -> ServedModel:
    llm = LLM(model, allowed_media_domains=policy.allowed_domains, allowed_local_media_path=policy.allowed_local_root,
              device=args.device, seed=args.seed, generation_config=args.generation_config,
              **vllm_engine_flags(args), **engine_args)
    loras = {}
    for i, module in enumerate(lora_modules, start=1):   # loaded before the engine starts: a bad one stops the start
        if module.name in loras or module.name in names:
            raise ValueError(f"--lora-modules: the name {module.name!r} is given twice")
        loras[module.name] = LoRARequest(module.name, i, module.path, module.base_model_name)
        llm.llm_engine.add_lora(loras[module.name])
    return ServedModel(names[0], AsyncLLMEngine(llm.llm_engine), metrics, policy, aliases=tuple(names[1:]),
                       max_queued_requests=args.max_queued_requests, chat_template=chat_template_option(args.chat_template),
                       loras=loras, lora_ids=len(loras))


def build_server_app(args):
    policy = media_policy(args)
    metrics = Metrics()
    names = args.served_model_name or [args.model if args.model else DEFAULT_MODEL_NAME]
    main_args = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
                     limit_mm_per_prompt=_limit_mm(args.limit_mm_per_prompt), enable_mm_embeds=args.enable_mm_embeds,
                     enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                     max_cpu_loras=args.max_cpu_loras)
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    lora_modules = [LoRAModule.parse(value) for value in args.lora_modules or ()]
    models = [load_served_model(args.model, names, main_args, args, metrics, policy, lora_modules)]
    if args.transcription_model:
        # The transcription model has settings of its own: the main model's (say max_model_len 4096) rarely fit it.
        default = args.transcription_model == "default"
        whisper_args = dict(max_model_len=args.transcription_max_model_len, dtype=args.transcription_dtype,
                            max_num_seqs=args.transcription_max_num_seqs)
        models.append(load_served_model(None if default else args.transcription_model,
                                        [DEFAULT_MODEL_NAME if default else args.transcription_model, WHISPER_ALIAS],
                                        whisper_args, args, metrics, policy))
    return build_app(models, metrics, api_key=args.api_key, max_upload_bytes=int(args.max_upload_mb * 2**20))


def serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_queued_requests < 0 or args.shutdown_timeout < 0 or args.max_upload_mb <= 0:
        raise ValueError("--max-queued-requests and --shutdown-timeout must be ≥ 0, --max-upload-mb > 0")
    app = build_server_app(args)
    run_server(app, args.host, args.port, args.shutdown_timeout, log_level=args.uvicorn_log_level)
    return 0
