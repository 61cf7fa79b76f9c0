"""The depth-elastic training loop (nanoGPT-style, one file).

    python -m training.train --config training/configs/tiny.toml --data DATA_DIR --out RUN_DIR
    torchrun --nproc_per_node 8 -m training.train --config training/configs/mesh-160m.toml --out RUN_DIR

Every optimizer step draws one recursion depth K (fixed / uniform / heavy-tailed, see depth.py)
and a global batch of random windows, both pure functions of (seed, step). Rank r of W takes its
contiguous share of the batch and splits it into micro-batches (gradient accumulation), so the
global batch, and the loss up to float rounding, do not depend on how many processes run it.

Rerunning the same command continues from RUN_DIR/latest with the optimizer, scheduler, RNG and
data position restored: on CPU the losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_trainer_state, read_summary, save_checkpoint
from .common import UsageError, pick_device, run_cli, write_json_atomic, write_text_atomic
from .config import config_to_dict, load_config
from .data import TokenData, batch_offsets, eval_offsets, windows
from .depth import sample_depth, unused_parameters


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def model_config(cfg: dict, meta: dict):
    """MeshConfig from the [model] table; vocab, positions and special ids default from the data."""
    from model import MeshConfig

    kw = dict(cfg["model"])
    layout = kw.pop("layout", None)
    if layout is None:
        raise UsageError("model.layout is required (e.g. '2+2R4+1', or '12' for a vanilla model)")
    kw.setdefault("vocab_size", 64 * math.ceil(meta["vocab_size"] / 64))  # a multiple of 64 runs faster
    kw.setdefault("max_position_embeddings", cfg["train"].seq_len)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw.setdefault(name, meta.get(name))
    try:
        config = MeshConfig.from_layout(str(layout), **kw)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if config.vocab_size < meta["vocab_size"]:
        raise UsageError(f"model.vocab_size {config.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    if cfg["train"].seq_len > config.max_position_embeddings:
        raise UsageError(f"train.seq_len {cfg['train'].seq_len} exceeds model.max_position_embeddings {config.max_position_embeddings}")
    return config


def generation_config(config):
    """Sampling defaults for a small LM (nanoGPT's sample.py: temperature 0.8, top-k 200)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=200,
        max_new_tokens=256,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def lr_lambda(tc):
    """Linear warmup to the peak, then cosine down to min_lr_ratio of the peak at max_steps."""

    def f(step: int) -> float:
        if step < tc.warmup:
            return (step + 1) / tc.warmup
        progress = min(1.0, (step - tc.warmup) / max(1, tc.max_steps - tc.warmup))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model, tc, fused: bool):
    """AdamW; no weight decay on biases, LayerNorms and other 1-D parameters (nanoGPT's split)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=fused or None)


def peak_flops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12), ("4090", 165e12)):
        if key in name:
            return value
    return 312e12


def applied_params(model, loops: int) -> int:
    """Non-embedding parameters applied per token at depth K (core counted K times) + the LM head."""

    def count(mod):
        return sum(p.numel() for p in mod.parameters())

    n = sum(count(m) for m in model.prelude) + loops * sum(count(m) for m in model.core) + sum(count(m) for m in model.coda)
    return n + count(model.recurrence) + count(model.embed_out)


# ---------------------------------------------------------------------------------------------
# Loss and eval
# ---------------------------------------------------------------------------------------------
def lm_loss(model, x: torch.Tensor, y: torch.Tensor, loops: int) -> torch.Tensor:
    logits = model(input_ids=x, loops=loops, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate_windows(model, tokens, offsets, seq_len, loops_list, device, autocast, batch: int, dd: Dist) -> dict[int, float]:
    """Mean next-token loss over fixed validation windows, per depth. Ranks split the windows."""
    was_training = model.training
    model.eval()
    mine = offsets[dd.rank :: dd.world]
    out = {}
    for k in loops_list:
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
        for i in range(0, len(mine), batch):
            x, y = windows(tokens, mine[i : i + batch], seq_len)
            x, y = x.to(device), y.to(device)
            with autocast():
                loss = lm_loss(model, x, y, k)
            total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=device)
        if dd.enabled:
            dist.all_reduce(total)
        out[k] = (total[0] / total[1]).item()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# State dicts (one code path for single process, DDP and FSDP)
# ---------------------------------------------------------------------------------------------
def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def get_states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_sd_options())


def set_states(model, optimizer, model_sd, optim_sd):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_sd_options())
    # Not strict: a parameter that never had a gradient yet (a router pair deeper than any depth
    # drawn so far) has no AdamW state, and that is fine.
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_sd_options(strict=False))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records past ``step`` (logged after the checkpoint we resume from, before a crash),
    and a last line cut short by a kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg: dict, out: str | Path, stop_after: int = 0, progress: bool = True) -> dict:
    """Trains (or resumes) into ``out``; returns a summary dict (final step, losses, tokens/s)."""
    from model import MeshConfig, MeshForCausalLM
    from safetensors.torch import load_file

    tc = cfg["train"]
    out = Path(out)
    if not cfg["data"].get("dir"):
        raise UsageError("no data directory: pass --data DIR or set data.dir in the config")
    data = TokenData(cfg["data"]["dir"])
    train_tokens, val_tokens = data.split("train"), data.split("val")

    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    dd, device = setup_distributed(tc.device)
    try:
        return _train(cfg, tc, out, data, train_tokens, val_tokens, dd, device, stop_after, progress, MeshConfig, MeshForCausalLM, load_file)
    finally:
        if dd.enabled:
            dist.destroy_process_group()


def _train(cfg, tc, out, data, train_tokens, val_tokens, dd, device, stop_after, progress, MeshConfig, MeshForCausalLM, load_file):
    # ---- batch geometry: the global batch is the same whatever the world size --------------
    if tc.batch_size % dd.world:
        raise UsageError(f"train.batch_size {tc.batch_size} is not divisible by the {dd.world} processes")
    per_rank = tc.batch_size // dd.world
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(f"per-process batch {per_rank} (batch_size / processes) is not divisible by train.micro_batch_size {micro}")
    accum = per_rank // micro

    # ---- resume or start --------------------------------------------------------------------
    found = [None]
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(out)
        found = [str(ckpt) if ckpt else None]
    if dd.enabled:
        dist.broadcast_object_list(found, src=0)
    ckpt = Path(found[0]) if found[0] else None
    if ckpt is not None:
        # Resuming a different model would silently train the old one: refuse instead.
        saved = read_summary(ckpt).get("config", {}).get("model")
        if saved is not None and saved != cfg["model"]:
            changed = sorted(k for k in set(saved) | set(cfg["model"]) if saved.get(k) != cfg["model"].get(k))
            raise UsageError(
                f"{out} holds a run of a different model (model.{', model.'.join(changed)} changed); "
                f"use another --out, or delete {out} to start over"
            )

    torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    if ckpt is not None:
        config = MeshConfig.from_pretrained(str(ckpt))
    else:
        config = model_config(cfg, data.meta)
    model = MeshForCausalLM(config).to(device)
    model.generation_config = generation_config(config)
    max_loops = config.max_loops
    fixed_k = tc.fixed_loops or config.default_loops
    if tc.depth_sampling == "weighted" and len(tc.depth_weights) != max_loops:
        raise UsageError(f"train.depth_weights needs {max_loops} weights (one per depth 1..max_loops), got {len(tc.depth_weights)}")
    if tc.depth_sampling == "fixed" and not 1 <= fixed_k <= max_loops:
        raise UsageError(f"train.fixed_loops: loops must be an integer in [1, {max_loops}], got {fixed_k}")
    eval_loops = tc.eval_loops or list(range(1, max_loops + 1))
    for k in eval_loops:
        if not isinstance(k, int) or not 1 <= k <= max_loops:
            raise UsageError(f"train.eval_loops entries must be integers in [1, {max_loops}], got {k!r}")

    use_cuda = device.type == "cuda"
    amp_dtype = None
    if tc.dtype == "bfloat16" or (tc.dtype == "auto" and use_cuda):
        amp_dtype = torch.bfloat16

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # ---- parallel wrappers --------------------------------------------------------------------
    raw = model
    if dd.enabled and tc.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in [*model.prelude, *model.core, *model.coda]:
            fully_shard(layer)
        fully_shard(model)
        train_model = model
    elif dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Router pairs past the step's depth are unused at that step.
        train_model = DDP(model, device_ids=[device.index] if use_cuda else None, find_unused_parameters=config.scheme == "mesh")
    else:
        train_model = model
    if tc.compile:
        train_model = torch.compile(train_model)

    # Dropout masks differ per rank; batches and depths never use this RNG.
    torch.manual_seed(tc.seed + dd.rank)
    optimizer = make_optimizer(raw, tc, fused=use_cuda and tc.parallel != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))

    step, tokens_seen, train_time, wall_before = 0, 0, 0.0, 0.0
    t_start = time.perf_counter()
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        set_states(raw, optimizer, load_file(str(ckpt / "model.safetensors")), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, train_time = state["step"], state["tokens"], state["train_time_s"]
        wall_before = state.get("wall_time_s", train_time)
        rngs = state["rng"]
        if len(rngs) == dd.world:
            set_rng_state(rngs[dd.rank], device)
        else:
            torch.manual_seed(tc.seed + 1000 * step + dd.rank)
    if dd.main:
        # Records past the step we start from belong to a run that died after them (step 0 when it
        # died before its first checkpoint): they are redone, so drop them.
        truncate_metrics(metrics_path, step)
        write_json_atomic(out / "train_config.json", config_to_dict(cfg))

    if step >= tc.max_steps:
        if dd.main:
            print(f"{out}: already trained to step {step} (train.max_steps = {tc.max_steps}); nothing to do")
        return {"step": step, "resumed_from": str(ckpt), "tokens": tokens_seen, "train_time_s": train_time}

    def save(at_step: int, losses: dict | None):
        model_sd, optim_sd = get_states(raw, optimizer)
        rngs = [None] * dd.world
        if dd.enabled:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        if dd.main:
            trainer_state = {
                "step": at_step,
                "tokens": tokens_seen,
                "train_time_s": train_time,
                "wall_time_s": wall_before + time.perf_counter() - t_start,
                "optimizer": optim_sd,
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                # The data position: batches are a function of (seed, step), so the next step is all
                # a resumed run needs to draw the same windows.
                "data": {"sampler": "random-windows", "seed": tc.seed, "next_step": at_step, "dir": str(data.path)},
            }
            summary = {
                "step": at_step,
                "tokens": tokens_seen,
                "train_time_s": round(train_time, 2),
                "wall_time_s": round(wall_before + time.perf_counter() - t_start, 2),
                "world_size": dd.world,
                "val_loss": {str(k): v for k, v in (losses or {}).items()},
                "config": config_to_dict(cfg),
            }
            save_checkpoint(out, at_step, raw, model_sd, trainer_state, data.path, summary, tc.keep_checkpoints)
        if dd.enabled:
            dist.barrier()

    n_params = raw.num_parameters(exclude_embeddings=True)
    peak = peak_flops(device, tc.peak_flops) * dd.world
    tokens_per_step = tc.batch_size * tc.seq_len
    if dd.main:
        print(
            f"model {config.layout} ({config.scheme}, max_loops {max_loops}): {n_params:,} non-embedding parameters, "
            f"{raw.num_parameters():,} total | {dd.world} process(es) on {device.type}, batch {tc.batch_size} x {tc.seq_len} "
            f"(micro {micro}, accumulation {accum}), depth sampling {tc.depth_sampling}"
            + (f" | resuming from {ckpt}" if ckpt else "")
        )

    val_offsets = eval_offsets(len(val_tokens), tc.seq_len, tc.eval_windows)
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not (progress and dd.main), dynamic_ncols=True)
    run_steps, last_losses = 0, None
    window_tokens, window_time, window_flops = 0, 0.0, 0.0
    train_model.train()
    while step < tc.max_steps:
        t0 = time.perf_counter()
        k = sample_depth(step, tc.seed, tc.depth_sampling, max_loops, fixed_k, tc.depth_mean, tc.depth_sigma, tc.depth_weights)
        offsets = batch_offsets(len(train_tokens), tc.seq_len, tc.batch_size, tc.seed, step)
        mine = offsets[dd.rank * per_rank : (dd.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            x, y = windows(train_tokens, mine[m * micro : (m + 1) * micro], tc.seq_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = m == accum - 1
            sync = contextlib.nullcontext()
            if dd.enabled and not last:  # all-reduce gradients only once per optimizer step
                sync = train_model.no_sync() if tc.parallel == "ddp" else _fsdp_no_sync(raw)
            with sync:
                with autocast():
                    loss = lm_loss(train_model, x, y, k) / accum
                loss.backward()
            loss_sum += loss.detach()
        if dd.enabled and tc.parallel == "fsdp":
            raw.set_requires_gradient_sync(True)
        for p in unused_parameters(raw, k):
            p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dd.enabled:
            dist.all_reduce(loss_sum)
            loss_sum /= dd.world
        loss_value = loss_sum.item()  # waits for the step to finish, so the timing below is honest
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value} at step {step} (depth {k}); lower train.lr or check the data")
        dt = time.perf_counter() - t0
        step += 1
        run_steps += 1
        tokens_seen += tokens_per_step
        train_time += dt
        window_tokens += tokens_per_step
        window_time += dt
        window_flops += applied_flops(raw, k, tc.seq_len) * tokens_per_step

        if dd.main:
            tok_s = window_tokens / max(window_time, 1e-9)
            post = {"loss": f"{loss_value:.3f}", "K": k, "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
            if peak:
                post["mfu"] = f"{100 * window_flops / window_time / peak:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % tc.log_interval == 0 or step == tc.max_steps:
                rec = {
                    "step": step,
                    "loss": loss_value,
                    "loops": k,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": tokens_seen,
                    "tok_per_s": round(tok_s, 1),
                    "train_time_s": round(train_time, 3),
                }
                if peak:
                    rec["mfu"] = window_flops / window_time / peak
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                window_tokens, window_time, window_flops = 0, 0.0, 0.0

        done = step == tc.max_steps
        if (tc.eval_interval and step % tc.eval_interval == 0) or done:
            last_losses = evaluate_windows(
                raw if tc.parallel == "ddp" else train_model, val_tokens, val_offsets, tc.seq_len, eval_loops, device, autocast, micro, dd
            )
            if dd.main:
                chars_per_token = data.meta["val"]["chars"] / data.meta["val"]["tokens"]
                rec = {
                    "step": step,
                    "eval": {str(kk): v for kk, v in last_losses.items()},
                    "nats_per_char": {str(kk): v / chars_per_token for kk, v in last_losses.items()},
                }
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.write("step {}: val loss {}".format(step, "  ".join(f"K={kk} {v:.4f}" for kk, v in last_losses.items())))
        stopping = stop_after and run_steps >= stop_after
        if done or stopping or (tc.checkpoint_interval and step % tc.checkpoint_interval == 0):
            save(step, last_losses)
        if stopping and not done:
            if dd.main:
                bar.write(f"stopping after {run_steps} steps (--stop-after-steps); rerun the same command to continue")
            break
    bar.close()
    return {
        "step": step,
        "resumed_from": str(ckpt) if ckpt else None,
        "tokens": tokens_seen,
        "train_time_s": train_time,
        "tok_per_s": tokens_seen / max(train_time, 1e-9),
        "val_loss": last_losses,
    }


def applied_flops(model, loops: int, seq_len: int) -> float:
    """Training FLOPs per token at depth K (PaLM appendix B): 6 N_applied + 12 L_applied d T."""
    c = model.config
    return 6 * applied_params(model, loops) + 12 * c.num_layer_applications(loops) * c.hidden_size * seq_len


def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a MeSH (or vanilla) model with depth-elastic recursion. Rerun the same command to resume from OUT/latest.",
        epilog="Multi-GPU / multi-node: torchrun --nproc_per_node N -m training.train ... (DDP; --set train.parallel=fsdp for FSDP).",
    )
    p.add_argument("--config", required=True, metavar="TOML", help="training config, e.g. training/configs/tiny.toml")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="override a config value (repeatable), e.g. train.lr=1e-3")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (overrides data.dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics.jsonl, latest")
    p.add_argument("--stop-after-steps", type=int, default=0, metavar="N", help="checkpoint and exit after N steps of this run (to fit a time slot)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        cfg = load_config(args.config, args.set, args.data)
        result = train(cfg, args.out, stop_after=args.stop_after_steps, progress=not args.quiet)
        if int(os.environ.get("RANK", "0")) == 0 and result.get("val_loss"):
            print("final val loss: " + "  ".join(f"K={k} {v:.4f}" for k, v in result["val_loss"].items()))

    return run_cli("train", body)


if __name__ == "__main__":
    raise SystemExit(main())
