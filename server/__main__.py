"""``python -m server``: serve a MeSH checkpoint over an OpenAI-compatible HTTP API.

Every flag can also be set with an environment variable (MESH_ + the flag's name in capitals, dashes
as underscores, e.g. MESH_KV_CACHE_MB=512); a flag on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

FLAGS = [
    # (flag, type, default, help)
    ("--model", str, None, "checkpoint directory (config.json, weights, tokenizer.json); default: the model "
                           "embedded in the package (model/default)"),
    ("--host", str, "127.0.0.1", "interface to listen on (0.0.0.0 for every interface)"),
    ("--port", int, 8000, "TCP port"),
    ("--device", str, "auto", "auto (CUDA when available), cpu, cuda or cuda:N"),
    ("--dtype", str, "auto", "weights: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"),
    ("--kv-cache-dtype", str, "auto", "the K/V pool: auto (as --dtype), float32, bfloat16, float16; bfloat16 holds "
                                      "twice the tokens in the same --kv-cache-mb, attention still runs in --dtype"),
    ("--compile", str, "auto", "torch.compile'd decode graphs, one per (batch bucket, depth): auto = on with CUDA "
                               "(CUDA graphs), off on CPU; on = also on CPU, where only batch buckets 1-2 compile "
                               "(13-28 s of compile per graph, in a background thread while eager steps serve; "
                               "cached on disk in $TORCHINDUCTOR_CACHE_DIR, default ~/.cache/mesh/inductor) for "
                               "0-7%% faster decoding at batch 1 (docs/BENCHMARKS.md part 8); off = eager only"),
    ("--max-batch-size", int, 64, "most sequences decoded together in one step"),
    ("--kv-cache-mb", float, None, "size of the K/V block pool in MiB, allocated at start and never exceeded "
                                   "(default 256 on CPU; on CUDA, when given, it wins over --gpu-memory-utilization)"),
    ("--gpu-memory-utilization", float, 0.9, "CUDA only, when --kv-cache-mb is not given: the pool takes the device "
                                              "memory free after loading the model, less (1 - this) of the total"),
    ("--block-size", int, 16, "tokens per K/V block (a block holds one tier: the prelude, one core iteration, "
                              "or the coda at one depth)"),
    ("--max-waiting", int, 128, "most sequences waiting for admission; past it requests get 429 with Retry-After"),
    ("--max-model-len", int, None, "longest prompt + max_tokens accepted; default the model's max_position_embeddings"),
    ("--max-num-batched-tokens", int, 256, "tokens one step may carry: one per decoding sequence plus prompt "
                                            "chunks (long prompts are split across steps, so running streams keep "
                                            "their pace); must be >= --max-batch-size"),
    ("--enable-prefix-caching", int, 1, "1: reuse the K/V of full blocks of earlier prompts (prelude and core "
                                        "iterations across depths, the coda at the same depth); 0: off"),
    ("--speculative-loops", int, 0, "self-speculation: greedy requests deeper than this draft tokens at this "
                                    "depth and verify them at their own in one pass that resumes the drafts' "
                                    "recurrence (identical tokens, fewer full-depth steps); 0 = off"),
    ("--num-speculative-tokens", int, 3, "tokens drafted per speculation round (with --speculative-loops)"),
    ("--speculative-max-batch", int, 1, "greedy and unseeded requests draft only while at most this many "
                                        "sequences run (drafting stops paying from 2 rows on this CPU, "
                                        "docs/SPECULATION.md); seeded sampled requests always draft"),
    ("--served-model-name", str, None, "the model name clients send; default the model directory's name"),
    ("--threads", int, 0, "CPU threads for torch (torch.set_num_threads); 0 = torch's default (all cores). On a "
                          "busy or small machine 1 is often fastest: decode steps are many small operations"),
    ("--log-level", str, "info", "debug, info, warning or error"),
    # Reliability and security (docs/RELIABILITY.md)
    ("--api-key-file", str, None, "file of API keys, one per line (# comments); with keys set, every path but "
                                  "/health, the docs and /metrics needs 'Authorization: Bearer <key>'"),
    ("--max-request-bytes", int, 4 * 2**20, "largest request body accepted; larger ones get 413"),
    ("--request-timeout", float, 600.0, "seconds from arrival after which a completion is aborted with 408 "
                                        "(an error event in a stream); 0 = no limit"),
    ("--shutdown-grace", float, 30.0, "on SIGTERM: seconds in-flight requests (streams included) get to finish "
                                      "while new ones are refused; then they are cut and the server exits"),
]
CHOICES = {"--dtype": ("auto", "float32", "bfloat16", "float16"), "--kv-cache-dtype": ("auto", "float32", "bfloat16", "float16"),
           "--compile": ("auto", "on", "off"), "--log-level": ("debug", "info", "warning", "error"),
           "--enable-prefix-caching": (0, 1)}


def env_name(flag: str) -> str:
    return "MESH_" + flag.lstrip("-").upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve a MeSH model with an OpenAI-compatible API (POST /v1/completions and "
                    "/v1/chat/completions with the extra field `loops`, the recursion depth of each request; "
                    "/v1/models, /health, /metrics, /tokenize, /detokenize) and a browser playground at /.",
        epilog="Each flag can be set by an environment variable, shown in brackets; the flag wins. "
               "Example: python -m server --port 8000 --kv-cache-mb 512",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, type_, default, help_ in FLAGS:
        parser.add_argument(flag, type=type_, default=default, choices=CHOICES.get(flag),
                            help=f"{help_} [{env_name(flag)}]")
    # Keys are never shown: no default in --help, and MESH_API_KEY is read after parsing.
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require this Bearer key (repeat for several keys; merged with --api-key-file) "
                             "[MESH_API_KEY, one key; prefer it or the file: flags show up in `ps`]")
    parser.add_argument("--metrics-require-key", action="store_true",
                        help="/metrics needs the key too (default: open, for Prometheus) [MESH_METRICS_REQUIRE_KEY=1]")
    parser.add_argument("--no-ui", action="store_true",
                        help="no browser playground at / (the API and /docs stay) [MESH_NO_UI=1]")
    return parser


def api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key (or MESH_API_KEY) and --api-key-file; ValueError (one line, no key shown) when bad."""
    from .api.security import check_key, read_key_file

    keys = list(args.api_key or [])
    if not keys and os.environ.get("MESH_API_KEY", "").strip():
        keys = [os.environ["MESH_API_KEY"].strip()]
    keys = [check_key(k, "--api-key") for k in keys]
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    return keys


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    for flag, type_, _, _ in FLAGS:  # environment variables become defaults, so flags override them
        raw = os.environ.get(env_name(flag), "").strip()
        if raw:
            try:
                value = type_(raw)
            except ValueError:
                parser.error(f"{env_name(flag)}={raw!r} is not a valid {type_.__name__}")
            if flag in CHOICES and value not in CHOICES[flag]:
                parser.error(f"{env_name(flag)}={raw!r} must be one of {', '.join(CHOICES[flag])}")
            parser.set_defaults(**{flag.lstrip("-").replace("-", "_"): value})
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("metrics_require_key", "no_ui"):  # switches: MESH_<FLAG>=1 turns them on
        if os.environ.get(env_name(flag), "").strip().lower() in ("1", "true", "yes"):
            setattr(args, flag, True)
    for flag in ("max_request_bytes", "request_timeout", "shutdown_grace"):
        if getattr(args, flag) < 0 or (flag == "max_request_bytes" and args.max_request_bytes < 1):
            parser.error(f"--{flag.replace('_', '-')} must be {'>= 1' if flag == 'max_request_bytes' else '>= 0'}, "
                         f"got {getattr(args, flag)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Heavy imports after argument parsing: --help and argument errors stay instant.
    import uvicorn

    import torch

    from .api.app import create_app
    from .engine import Engine, EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        keys = api_keys(args)  # before the model loads: a bad key file fails fast
        config = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
            kv_cache_mb=args.kv_cache_mb, gpu_memory_utilization=args.gpu_memory_utilization,
            block_size=args.block_size, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=bool(args.enable_prefix_caching),
            speculative_loops=args.speculative_loops, num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_batch=args.speculative_max_batch,
            served_model_name=args.served_model_name, kv_cache_dtype=args.kv_cache_dtype, compile=args.compile,
        )
        engine = Engine(config)
    except (ValueError, OSError) as e:
        print(f"python -m server: error: {e}", file=sys.stderr)
        return 2
    log_startup(engine, args, keys)
    app = create_app(engine, api_keys=keys, metrics_require_key=args.metrics_require_key,
                     max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout or None,
                     ui=not args.no_ui)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: uvicorn stops accepting and drains connections;
            app.state.draining = True  # a request on a kept-alive connection meanwhile gets 503
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.shutdown_grace))
    threading.Thread(target=watch_engine, args=(engine, server), name="engine-watchdog", daemon=True).start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the handler it found
    # at start; a no-op one lets a graceful shutdown end with exit status 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn after its graceful shutdown
        pass
    if engine.error is not None:
        print(f"python -m server: error: the engine stopped ({type(engine.error).__name__}: {engine.error})", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def log_startup(engine, args: argparse.Namespace, keys: list[str]) -> None:
    """What is served, where, with what K/V pool and which protections: the first lines an operator reads."""
    import torch

    cfg, log = engine.model.config, logging.getLogger("server")
    log.info("serving %s (%s, scheme %s, loops 1..%d, default %d) on %s (%d threads), %s, max_model_len %d, "
             "at http://%s:%d", engine.model_name, cfg.layout, cfg.scheme, cfg.max_loops, cfg.default_loops,
             engine.device, torch.get_num_threads(), str(engine.dtype).replace("torch.", ""), engine.max_model_len,
             args.host, args.port)
    log.info("%s", engine.describe_pool())
    graphs = engine.runner.compiled
    log.info("decode graphs (--compile %s): %s", args.compile,
             f"batch buckets up to {graphs.max_batch}, compiled as first needed" if graphs else "off, eager decoding")
    log.info("API keys: %s; /metrics %s; request body <= %d bytes; request timeout %s; shutdown grace %g s",
             f"{len(keys)} configured" if keys else "none (open to anyone who can reach the port)",
             "needs a key" if keys and args.metrics_require_key else "open", args.max_request_bytes,
             f"{args.request_timeout:g} s" if args.request_timeout else "none", args.shutdown_grace)


def watch_engine(engine, server, interval: float = 0.2) -> None:
    """If the engine thread dies, shuts the server down (exit status 1) instead of answering 503 forever:
    a supervisor (systemd, Kubernetes) then restarts it. Requests in flight already got an error."""
    while not server.should_exit:
        if engine.error is not None:
            logging.getLogger("server").error("the engine thread died: shutting down")
            server.should_exit = True
            return
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
