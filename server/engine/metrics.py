"""Prometheus metrics (prometheus-client). Dashboards and alerts rely on these names; do not rename.

    mesh_requests_total{status,finish_reason}   HTTP status of every completion request, rejections included;
                                                finish_reason "" when none (errors), "abort" when the client left
    mesh_prompt_tokens_total                    prompt tokens of accepted requests
    mesh_generation_tokens_total{loops}         generated tokens by depth
    mesh_time_to_first_token_seconds            histograms, per sequence (vLLM's buckets)
    mesh_inter_token_latency_seconds
    mesh_e2e_request_latency_seconds
    mesh_request_queue_time_seconds
    mesh_request_loops                          requested depth, per request
    mesh_requests_running / mesh_requests_waiting / mesh_max_waiting   gauges
    mesh_kv_cache_usage_ratio                   used K/V blocks / all blocks of the pool (0-1)
    mesh_num_preemptions_total                  running sequences preempted (blocks freed, recomputed later)
    mesh_prefix_cache_queries_total             prompt tokens looked up in the prefix cache
    mesh_prefix_cache_hits_total                of those, tokens whose K/V were found cached
    mesh_spec_decode_num_draft_tokens_total     tokens drafted at the speculative depth
    mesh_spec_decode_num_accepted_tokens_total  of those, accepted by the verify pass
    mesh_token_loops                            core iterations per generated token (drafts included)
    mesh_model_info{layout,scheme,max_loops,...} the model being served (prometheus-client's Info: value 1)

Each `Metrics` has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: half the output, and nothing here reads them

# vLLM's bucket choices; inter-token latency gets three finer buckets (small models decode in milliseconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, max_loops: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mesh_requests", "Completion requests by HTTP status and finish reason",
                                ["status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("mesh_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("mesh_generation_tokens", "Generated tokens by recursion depth", ["loops"], registry=r)
        self.ttft = Histogram("mesh_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mesh_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mesh_e2e_request_latency_seconds", "Arrival to last token", buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("mesh_request_queue_time_seconds", "Arrival to admission into the running batch",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.loops = Histogram("mesh_request_loops", "Requested recursion depth", buckets=tuple(range(1, max_loops + 1)), registry=r)
        self.running = Gauge("mesh_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("mesh_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_usage = Gauge("mesh_kv_cache_usage_ratio", "Used share of the K/V block pool (0-1)", registry=r)
        self.preemptions = Counter("mesh_num_preemptions", "Running sequences preempted for lack of K/V blocks", registry=r)
        self.prefix_queries = Counter("mesh_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("mesh_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.spec_drafts = Counter("mesh_spec_decode_num_draft_tokens", "Tokens drafted at the speculative depth", registry=r)
        self.spec_accepted = Counter("mesh_spec_decode_num_accepted_tokens", "Drafted tokens accepted by verification",
                                     registry=r)
        self.token_loops = Histogram("mesh_token_loops", "Core iterations computed per generated token (drafts included)",
                                     buckets=tuple(float(k) for k in range(1, max_loops + 1)) + (2.0 * max_loops,), registry=r)
        self.max_waiting = Gauge("mesh_max_waiting", "Bound of the waiting queue (429 past it)", registry=r)
        self.model = Info("mesh_model", "The model being served", registry=r)
        self._gen = {k: self.generation_tokens.labels(loops=str(k)) for k in [*range(1, max_loops + 1), "auto"]}

    def bind(self, engine) -> None:
        """Gauges read the engine when scraped: no per-step cost."""
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: engine.num_waiting)
        self.kv_usage.set_function(lambda: engine.blocks.usage)
        self.max_waiting.set(engine.config.max_waiting)
        cfg = engine.model.config
        self.model.info({
            "name": engine.model_name, "layout": cfg.layout, "scheme": cfg.scheme, "max_loops": str(cfg.max_loops),
            "default_loops": str(cfg.default_loops), "dtype": str(engine.dtype).replace("torch.", ""),
            "device": str(engine.device),
        })

    def count_generated(self, loops: int, n: int) -> None:
        self._gen[loops].inc(n)

    def count_speculation(self, drafted: int, accepted: int) -> None:
        self.spec_drafts.inc(drafted)
        self.spec_accepted.inc(accepted)

    def observe_token_loops(self, loops: float, n: int) -> None:
        """n generated tokens that cost `loops` core iterations each."""
        for _ in range(n):
            self.token_loops.observe(loops)

    def render(self) -> bytes:
        return generate_latest(self.registry)
