"""The depth-elastic training loop (nanoGPT-style): build_run sets a Run up, train_step does one step.

    python -m training.train --config training/configs/tiny.toml --data DATA_DIR --out RUN_DIR
    python -m training.train --config training/configs/chains.toml --out RUN_DIR   # generated problems
    torchrun --nproc_per_node 8 -m training.train --config training/configs/mesh-160m.toml --out RUN_DIR

Every optimizer step draws one recursion depth K (fixed / uniform / heavy-tailed, see depth.py)
and a global batch (random windows of a token file, or chains problems: sources.py), both pure
functions of (seed, step). With train.depth_losses = "all" the loss is the mean over depths 1..K of
one pass (depth_logits). Rank r of W takes its
contiguous share of the batch and splits it into micro-batches (gradient accumulation), so the
global batch, and the loss up to float rounding, do not depend on how many processes run it.

Rerunning the same command continues from RUN_DIR/latest with the optimizer, scheduler, RNG and
data position restored: on CPU the losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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
from .config import config_to_dict, load_config, model_config
from .depth import sample_depth, unused_parameters
from .sources import IGNORE, ChainsSource, WindowSource, make_source


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
def depth_logits(model, x: torch.Tensor, depths: list[int]) -> dict[int, torch.Tensor]:
    """Logits (B, T, V) at each depth in ``depths`` from one pass: iterations up to the deepest are
    shared, each extra depth costs one coda and head."""
    B, T = x.shape
    ctx = model.layer_context(torch.arange(T, device=x.device)[None].expand(B, T), loops=max(depths))
    state, done, out = model.start(model.embed(x), ctx), 0, {}
    for k in sorted(depths):
        state, done = model.iterate(state, done, k, ctx), k
        out[k] = model.compute_logits(model.finish(state, dataclasses.replace(ctx, loops=k)))
    return out


def step_loss(model, x, y, loops: int, all_depths: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits at the deepest depth): cross-entropy over labelled positions at depth ``loops``, or
    the mean of it over every depth 1..loops (train.depth_losses = "all")."""
    if all_depths:
        per_depth = depth_logits(model, x, list(range(1, loops + 1)))
    else:
        per_depth = {loops: model(input_ids=x, loops=loops, use_cache=False).logits}
    losses = [F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=IGNORE) for lg in per_depth.values()]
    return sum(losses) / len(losses), per_depth[loops]


@torch.no_grad()
def evaluate_windows(model, source, loops_list, device, autocast, batch: int, dd: Dist) -> dict[int, float]:
    """Mean next-token loss over the source's fixed validation windows, per depth. Ranks split the windows."""
    was_training = model.training
    model.eval()
    out = {}
    for k in loops_list:
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
        for x, y in source.eval_batches(dd.rank, dd.world, batch):
            x, y = x.to(device), y.to(device)
            with autocast():
                loss, _ = step_loss(model, x, y, k, False)
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


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Setting a run up
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything one training run holds; the functions below each do one job with it."""

    cfg: dict
    out: Path
    dd: Dist
    device: torch.device
    source: object  # training.sources.WindowSource or ChainsSource
    raw: torch.nn.Module  # the model itself (state dicts, unused-parameter pruning)
    model: torch.nn.Module  # what the step runs: raw, or its DDP / FSDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    micro: int
    accum: int
    amp_dtype: torch.dtype | None
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    wall_before: float = 0.0
    t_start: float = 0.0
    resumed_from: Path | None = None
    last_eval: dict | None = None

    @property
    def tc(self):
        return self.cfg["train"]

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def batch_geometry(tc, dd: Dist) -> tuple[int, int, int]:
    """(rows per rank, micro-batch rows, accumulation steps): the global batch is the same whatever the world size."""
    if tc.batch_size % dd.world:
        raise UsageError(f"train.batch_size {tc.batch_size} is not divisible by the {dd.world} processes")
    per_rank = tc.batch_size // dd.world
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(f"per-process batch {per_rank} (batch_size / processes) is not divisible by train.micro_batch_size {micro}")
    return per_rank, micro, per_rank // micro


def find_checkpoint(cfg: dict, out: Path, dd: Dist) -> Path | None:
    """RUN_DIR/latest (found by rank 0, shared with the others); refuses a run of a different model."""
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
    return ckpt


def check_depths(tc, config, dd: Dist) -> None:
    """Depth settings that need the model's max_loops."""
    max_loops = config.max_loops
    if tc.depth_sampling == "weighted" and len(tc.depth_weights) != max_loops:
        raise UsageError(f"train.depth_weights needs {max_loops} weights (one per depth 1..max_loops), got {len(tc.depth_weights)}")
    fixed_k = tc.fixed_loops or config.default_loops
    if tc.depth_sampling == "fixed" and not 1 <= fixed_k <= max_loops:
        raise UsageError(f"train.fixed_loops: loops must be an integer in [1, {max_loops}], got {fixed_k}")
    for k in tc.eval_loops:
        if not isinstance(k, int) or not 1 <= k <= max_loops:
            raise UsageError(f"train.eval_loops entries must be integers in [1, {max_loops}], got {k!r}")
    if tc.depth_losses == "all" and (dd.enabled or tc.compile):
        raise UsageError("train.depth_losses = 'all' runs the model's stages directly: one process, no train.compile")


def wrap_model(model, tc, dd: Dist, device: torch.device):
    """DDP or FSDP under torchrun, then torch.compile if asked; the model itself otherwise."""
    wrapped = model
    if dd.enabled and tc.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in [*model.prelude, *model.core, *model.coda]:
            fully_shard(layer)
        fully_shard(model)
    elif dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Router pairs past the step's depth are unused at that step.
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=model.config.scheme == "mesh")
    return torch.compile(wrapped) if tc.compile else wrapped


def build_run(cfg: dict, out: Path, dd: Dist, device: torch.device) -> Run:
    """Model, optimizer and schedule, fresh or restored from RUN_DIR/latest."""
    from model import MeshConfig, MeshForCausalLM

    tc = cfg["train"]
    source = make_source(cfg, out)
    _, micro, accum = batch_geometry(tc, dd)
    ckpt = find_checkpoint(cfg, out, dd)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    config = MeshConfig.from_pretrained(str(ckpt)) if ckpt is not None else model_config(cfg, source.meta)
    check_depths(tc, config, dd)
    raw = MeshForCausalLM(config).to(device)
    if ckpt is None and tc.init_from:  # before FSDP shards it
        init_weights(raw, tc.init_from)
    raw.generation_config = generation_config(config)
    use_cuda = device.type == "cuda"
    amp = torch.bfloat16 if tc.dtype == "bfloat16" or (tc.dtype == "auto" and use_cuda) else None
    model = wrap_model(raw, tc, dd, device)
    # Dropout masks differ per rank; batches and depths never use this RNG.
    torch.manual_seed(tc.seed + dd.rank)
    optimizer = make_optimizer(raw, tc, fused=use_cuda and tc.parallel != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    run = Run(cfg, out, dd, device, source, raw, model, optimizer, scheduler, micro, accum, amp, t_start=time.perf_counter())
    if ckpt is not None:
        restore(run, ckpt)
    if dd.main:
        # Records past the step we start from belong to a run that died after them (step 0 when it
        # died before its first checkpoint): they are redone, so drop them.
        truncate_metrics(run.metrics_path, run.step)
        write_json_atomic(out / "train_config.json", config_to_dict(cfg))
    return run


def init_weights(raw, path: str) -> None:
    """Fine-tuning: a fresh run starts from the weights of the model in ``path`` (same architecture)."""
    from model import MeshForCausalLM

    if not (Path(path) / "model.safetensors").is_file():
        raise UsageError(f"train.init_from: no model.safetensors in {path}")
    source = MeshForCausalLM.from_pretrained(path)
    try:
        raw.load_state_dict(source.state_dict())
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UsageError(f"train.init_from: {path} is a different architecture than [model] ({first})") from None


def restore(run: Run, ckpt: Path) -> None:
    from safetensors.torch import load_file

    state = load_trainer_state(ckpt)
    set_states(run.raw, run.optimizer, load_file(str(ckpt / "model.safetensors")), state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.source.load_state_dict(state["data"])
    run.step, run.tokens, run.train_time = state["step"], state["tokens"], state["train_time_s"]
    run.wall_before = state.get("wall_time_s", run.train_time)
    run.resumed_from = ckpt
    rngs = state["rng"]
    if len(rngs) == run.dd.world:
        set_rng_state(rngs[run.dd.rank], run.device)
    else:
        torch.manual_seed(run.tc.seed + 1000 * run.step + run.dd.rank)


def save(run: Run) -> None:
    """Checkpoint at run.step (all ranks take part in gathering the state; rank 0 writes)."""
    dd = run.dd
    model_sd, optim_sd = get_states(run.raw, run.optimizer)
    rngs = [None] * dd.world
    if dd.enabled:
        dist.all_gather_object(rngs, rng_state(run.device))
    else:
        rngs = [rng_state(run.device)]
    if not dd.main:
        dist.barrier()
        return
    wall = run.wall_before + time.perf_counter() - run.t_start
    trainer_state = {
        "step": run.step,
        "tokens": run.tokens,
        "train_time_s": run.train_time,
        "wall_time_s": wall,
        "optimizer": optim_sd,
        "scheduler": run.scheduler.state_dict(),
        "rng": rngs,
        # The data position: batches are a function of (seed, step) (and the chains curriculum level),
        # so the next step and the source's state are all a resumed run needs to draw the same batches.
        "data": {**run.source.state_dict(), "next_step": run.step},
    }
    summary = {
        "step": run.step,
        "tokens": run.tokens,
        "train_time_s": round(run.train_time, 2),
        "wall_time_s": round(wall, 2),
        "world_size": dd.world,
        "val_loss" if isinstance(run.source, WindowSource) else "val_accuracy": run.last_eval or {},
        "config": config_to_dict(run.cfg),
    }
    save_checkpoint(run.out, run.step, run.raw, model_sd, trainer_state, run.source.tokenizer_dir, summary, run.tc.keep_checkpoints)
    if dd.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg: dict, out: str | Path, stop_after: int = 0, progress: bool = True) -> dict:
    """Trains (or resumes) into ``out``; returns a summary dict (final step, losses, tokens/s)."""
    tc = cfg["train"]
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    dd, device = setup_distributed(tc.device)
    try:
        run = build_run(cfg, Path(out), dd, device)
        if run.step >= tc.max_steps:
            if dd.main:
                print(f"{out}: already trained to step {run.step} (train.max_steps = {tc.max_steps}); nothing to do")
            return {"step": run.step, "resumed_from": str(run.resumed_from), "tokens": run.tokens, "train_time_s": run.train_time}
        return train_loop(run, stop_after, progress)
    finally:
        if dd.enabled:
            dist.destroy_process_group()


def train_loop(run: Run, stop_after: int, progress: bool) -> dict:
    tc, dd = run.tc, run.dd
    if dd.main:
        print(describe(run))
    peak = peak_flops(run.device, tc.peak_flops) * dd.world
    bar = tqdm(total=tc.max_steps, initial=run.step, desc="train", disable=not (progress and dd.main), dynamic_ncols=True)
    window = {"tokens": 0, "time": 0.0, "flops": 0.0}
    run_steps = 0
    run.model.train()
    while run.step < tc.max_steps:
        loss, k, lr, grad_norm, dt, n_tokens = train_step(run)
        run.step += 1
        run_steps += 1
        run.tokens += n_tokens
        run.train_time += dt
        window["tokens"] += n_tokens
        window["time"] += dt
        window["flops"] += applied_flops(run.raw, k, tc.seq_len) * n_tokens
        if dd.main:
            log_step(run, bar, window, peak, loss, k, lr, grad_norm)
        done = run.step == tc.max_steps
        if (tc.eval_interval and run.step % tc.eval_interval == 0) or done:
            run_eval(run, bar)
        stopping = stop_after and run_steps >= stop_after
        if done or stopping or (tc.checkpoint_interval and run.step % tc.checkpoint_interval == 0):
            save(run)
        if stopping and not done:
            if dd.main:
                bar.write(f"stopping after {run_steps} steps (--stop-after-steps); rerun the same command to continue")
            break
    bar.close()
    return {
        "step": run.step,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "tokens": run.tokens,
        "train_time_s": run.train_time,
        "tok_per_s": run.tokens / max(run.train_time, 1e-9),
        "val_loss": run.last_eval if isinstance(run.source, WindowSource) else None,
        "val_accuracy": run.last_eval if not isinstance(run.source, WindowSource) else None,
    }


def describe(run: Run) -> str:
    tc, c = run.tc, run.raw.config
    return (
        f"model {c.layout} ({c.scheme}, max_loops {c.max_loops}): {run.raw.num_parameters(exclude_embeddings=True):,} non-embedding parameters, "
        f"{run.raw.num_parameters():,} total | {run.dd.world} process(es) on {run.device.type}"
        + (f" with {wrapper_name(run.model)}" if run.dd.enabled else "")
        + f", batch {tc.batch_size} x {tc.seq_len} "
        f"(micro {run.micro}, accumulation {run.accum}), depth sampling {tc.depth_sampling}"
        + (f", losses at every depth" if tc.depth_losses == "all" else "")
        + (f" | resuming from {run.resumed_from}" if run.resumed_from else "")
    )


def wrapper_name(model) -> str:
    """What the model object really is (fully_shard turns the class into FSDP<name>), not what the config asked."""
    name = type(getattr(model, "_orig_mod", model)).__name__
    return "DDP" if name == "DistributedDataParallel" else "FSDP" if name.startswith("FSDP") else name


def train_step(run: Run):
    """One optimizer step at a depth drawn from (seed, step): (loss, K, lr, grad norm, seconds, tokens)."""
    tc, dd, raw = run.tc, run.dd, run.raw
    t0 = time.perf_counter()
    k = sample_depth(run.step, tc.seed, tc.depth_sampling, raw.config.max_loops, tc.fixed_loops or raw.config.default_loops, tc.depth_mean, tc.depth_sigma, tc.depth_weights)
    k = min(k, run.source.max_loops(raw.config.max_loops, run.step))  # a chains curriculum caps the depth of easy levels
    lo = dd.rank * run.micro * run.accum
    loss_sum = torch.zeros((), device=run.device)
    counts, n_tokens = None, 0
    for m in range(run.accum):
        x, y, hops = run.source.batch(run.step, lo + m * run.micro, lo + (m + 1) * run.micro)
        n_tokens += x.numel() * dd.world
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sync = contextlib.nullcontext()
        if dd.enabled and m < run.accum - 1:  # all-reduce gradients only once per optimizer step
            sync = run.model.no_sync() if tc.parallel == "ddp" else _fsdp_no_sync(raw)
        with sync:
            with run.autocast():
                loss, logits = step_loss(run.model, x, y, k, tc.depth_losses == "all")
                loss = loss / run.accum
            loss.backward()
        loss_sum += loss.detach()
        if hops is not None:
            c = run.source.level_counts(y.cpu(), logits.detach().argmax(-1).cpu(), hops)
            counts = c if counts is None else counts + c
    if dd.enabled and tc.parallel == "fsdp":
        raw.set_requires_gradient_sync(True)
    for p in unused_parameters(raw, k, all_depths=tc.depth_losses == "all"):
        p.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if dd.enabled:
        dist.all_reduce(loss_sum)
        loss_sum /= dd.world
    loss_value = loss_sum.item()  # waits for the step to finish, so the timing below is honest
    if not math.isfinite(loss_value):
        raise RuntimeError(f"loss is {loss_value} at step {run.step} (depth {k}); lower train.lr or check the data")
    if counts is not None:
        if dd.enabled:
            counts = counts.to(run.device)
            dist.all_reduce(counts)
        run.source.observe(counts.cpu())
    return loss_value, k, lr, float(grad_norm), time.perf_counter() - t0, n_tokens


def log_step(run: Run, bar, window: dict, peak: float, loss: float, k: int, lr: float, grad_norm: float) -> None:
    tok_s = window["tokens"] / max(window["time"], 1e-9)
    post = {"loss": f"{loss:.3f}", "K": k, "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
    if peak:
        post["mfu"] = f"{100 * window['flops'] / window['time'] / peak:.1f}%"
    bar.set_postfix(post, refresh=False)
    bar.update(1)
    if run.step % run.tc.log_interval and run.step != run.tc.max_steps:
        return
    rec = {
        "step": run.step,
        "loss": loss,
        "loops": k,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": run.tokens,
        "tok_per_s": round(tok_s, 1),
        "train_time_s": round(run.train_time, 3),
    }
    if peak:
        rec["mfu"] = window["flops"] / window["time"] / peak
    if isinstance(run.source, ChainsSource):
        rec["curriculum"] = run.source.curriculum()
    append_metrics(run.metrics_path, rec)
    window.update(tokens=0, time=0.0, flops=0.0)


def run_eval(run: Run, bar) -> None:
    """Validation loss per depth (text) or accuracy per hop count x depth (chains), logged by rank 0."""
    tc = run.tc
    loops = tc.eval_loops or list(range(1, run.raw.config.max_loops + 1))
    evaluated = run.raw if tc.parallel == "ddp" else run.model
    if isinstance(run.source, WindowSource):
        run.last_eval = evaluate_windows(evaluated, run.source, loops, run.device, run.autocast, run.micro, run.dd)
        rec = {"eval": {str(k): v for k, v in run.last_eval.items()}, "nats_per_char": run.source.nats_per_char(run.last_eval)}
        line = "val loss " + "  ".join(f"K={k} {v:.4f}" for k, v in run.last_eval.items())
    else:
        from .evaluate_chains import accuracy_table, model_answers, table_json

        hops = list(range(1, run.source.c["max_hops"] + 1))
        table = accuracy_table(functools.partial(model_answers, run.raw), hops, loops, tc.eval_windows, "val", tc.seed,
                               run.source.c["max_offset"])  # the problems it trains on (copy chains with max_offset 0)
        run.last_eval = table_json(table)
        rec = {"accuracy": run.last_eval}
        line = "val accuracy at K=max: " + " ".join(f"{h}h {row[max(loops)]:.2f}" for h, row in table.items())
    if run.dd.main:
        append_metrics(run.metrics_path, {"step": run.step, **rec})
        bar.write(f"step {run.step}: {line}")


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
        if int(os.environ.get("RANK", "0")) == 0 and result.get("val_accuracy"):
            print("final val accuracy (hops: accuracy at each eval depth): " + json.dumps(result["val_accuracy"]))

    return run_cli("train", body)


if __name__ == "__main__":
    raise SystemExit(main())
