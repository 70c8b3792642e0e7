"""Prometheus metrics (GET /metrics). Each server gets its own registry, so several can share a process."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hark.outputs import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hark_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("hark_requests_rejected", "Requests refused with 429 (over --max-queued-requests)",
                                ["model"], registry=r)
        self.prompt_tokens = Counter("hark_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("hark_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.audio_seconds = Counter("hark_audio_seconds", "Seconds of audio transcribed", ["model"], registry=r)
        self.ttft = Histogram("hark_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("hark_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.running = Gauge("hark_num_requests_running", "Sequences the engine is running", ["model"], registry=r)
        self.waiting = Gauge("hark_num_requests_waiting", "Sequences waiting for a slot (queue length)",
                             ["model"], registry=r)
        self.in_flight = Gauge("hark_num_requests_in_flight", "Requests accepted and not finished", ["model"],
                               registry=r)
        self.kv_usage = Gauge("hark_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", ["model"], registry=r)
        self.kv_free = Gauge("hark_kv_cache_free_blocks", "Free KV-cache blocks", ["model"], registry=r)
        self.prefix_hit_rate = Gauge("hark_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                     ["model"], registry=r)
        self.encoder_cache_hits = Gauge("hark_encoder_cache_hits", "Audio encoder outputs reused from the cache",
                                        ["model"], registry=r)
        self.lora_loaded = Gauge("hark_lora_adapters_loaded", "LoRA adapters loaded", ["model"], registry=r)
        self.lora_running = Gauge("hark_lora_adapters_running", "LoRA adapters the running sequences use",
                                  ["model"], registry=r)

    def observe_finished(self, model: str, out: RequestOutput) -> None:
        """Token counts and latencies of a finished request."""
        m = out.metrics
        generated = sum(len(c.token_ids) for c in out.outputs)
        self.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(model).inc(generated)
        if m is not None and m.first_token_time is not None:
            self.ttft.labels(model).observe(m.first_token_time - m.arrival_time)
            longest = max((len(c.token_ids) for c in out.outputs), default=0)
            if m.finished_time is not None and longest > 1:
                self.tpot.labels(model).observe((m.finished_time - m.first_token_time) / (longest - 1))

    def render(self, engines: dict) -> bytes:
        """engines: served name -> AsyncLLMEngine; gauges are read from each engine's latest stats."""
        for name, engine in engines.items():
            s = engine.stats
            self.running.labels(name).set(s["num_running"])
            self.waiting.labels(name).set(s["num_waiting"])
            self.in_flight.labels(name).set(engine.num_in_flight)
            self.kv_usage.labels(name).set(s["kv_usage"])
            self.kv_free.labels(name).set(s["kv_free_blocks"])
            self.prefix_hit_rate.labels(name).set(s["prefix_cache_hit_rate"])
            self.encoder_cache_hits.labels(name).set(s["encoder_cache_hits"])
            self.lora_loaded.labels(name).set(s["lora_adapters_loaded"])
            self.lora_running.labels(name).set(s["lora_adapters_running"])
        return generate_latest(self.registry)
