"""Training configuration: a TOML file with [data], [model] and [train] tables, plus overrides.

    python -m training.train --config training/configs/tiny.toml --set train.lr=1e-3 --set model.layout=2+2R4+1

``[model]`` holds MeshConfig fields plus ``layout`` (the paper's ``P+CRK+D``); ``vocab_size``
defaults to the tokenizer's, rounded up to a multiple of 64, and ``max_position_embeddings`` to
``train.seq_len``. ``[train]`` is `TrainConfig` below; ``[data]`` names the prepared data directory
(and, for ``training.default_model``, how to prepare it).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .common import UsageError

DEPTH_SAMPLING = ("fixed", "uniform", "weighted", "heavy")


@dataclasses.dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 32  # sequences per optimizer step, all ranks and micro-steps together
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = batch_size / world (no accumulation)
    max_steps: int = 1000
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = -1  # -1 = 1% of max_steps (the paper's warmup)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # Depth-elastic training: the recursion depth K of each step (the same on every rank).
    depth_sampling: str = "uniform"  # fixed | uniform over [1, max_loops] | weighted | heavy (Huginn-style)
    fixed_loops: int = 0  # for "fixed"; 0 = model.default_loops
    depth_weights: list = dataclasses.field(default_factory=list)  # for "weighted": one weight per depth 1..max_loops
    depth_mean: float = 2.5  # for "heavy": the mean of K before clipping to [1, max_loops]
    depth_sigma: float = 0.5  # for "heavy": sigma of the log-normal rate
    depth_losses: str = "last"  # last: the loss at the step's depth K | all: the mean loss at every depth 1..K
    eval_interval: int = 100  # steps between evals (and at the end); 0 = only at the end
    eval_windows: int = 64  # validation windows per eval (evenly spaced over the split)
    eval_loops: list = dataclasses.field(default_factory=list)  # depths to eval; [] = 1..max_loops
    log_interval: int = 10  # steps between metrics.jsonl records
    checkpoint_interval: int = 200  # steps between checkpoints (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many step-N checkpoints to keep
    seed: int = 1337
    init_from: str = ""  # a model directory (HF format, e.g. model/chains) whose weights start a fresh run; a resume ignores it
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads per process; 0 = torch's default (one per core)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # ddp | fsdp (under torchrun with more than one process)
    peak_flops: float = 0.0  # per device, for MFU; 0 = guess from the GPU name

    def check(self) -> None:
        positive = ("seq_len", "batch_size", "max_steps", "eval_windows", "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.depth_sampling not in DEPTH_SAMPLING:
            raise UsageError(f"train.depth_sampling must be one of {', '.join(DEPTH_SAMPLING)}, got {self.depth_sampling!r}")
        if self.depth_sampling == "weighted" and (
            not self.depth_weights or any(not isinstance(w, (int, float)) or w < 0 for w in self.depth_weights) or sum(self.depth_weights) <= 0
        ):
            raise UsageError(f"train.depth_weights must be non-negative numbers, one per depth 1..max_loops, got {self.depth_weights!r}")
        if self.depth_sampling == "heavy" and self.depth_mean < 1:
            raise UsageError(f"train.depth_mean must be >= 1, got {self.depth_mean}")
        if self.depth_losses not in ("last", "all"):
            raise UsageError(f"train.depth_losses must be 'last' or 'all', got {self.depth_losses!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UsageError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UsageError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    @property
    def warmup(self) -> int:
        return max(1, self.max_steps // 100) if self.warmup_steps < 0 else self.warmup_steps


def _model_fields() -> set[str]:
    from model import MeshConfig

    fields = set()
    for klass in MeshConfig.__mro__:
        fields |= set(getattr(klass, "__annotations__", {}))
    return fields | {"layout"}


def parse_value(text: str):
    """A --set value as TOML (numbers, booleans, [lists], "strings"); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = (), data_dir: str | None = None) -> dict:
    """{"data": {...}, "model": {...}, "train": TrainConfig} from a TOML file and ``key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{p}: invalid TOML: {e}") from None
    for table in raw:
        if table not in ("data", "model", "train"):
            raise UsageError(f"unknown config table [{table}] (expected [data], [model], [train])")
    cfg = {t: dict(raw.get(t, {})) for t in ("data", "model", "train")}
    for item in overrides:
        key, eq, value = item.partition("=")
        table, dot, name = key.strip().partition(".")
        if not eq or not dot or table not in cfg or not name:
            raise UsageError(f"--set expects table.key=value with table data, model or train, got {item!r}")
        cfg[table][name] = parse_value(value.strip())
    if data_dir is not None:
        cfg["data"]["dir"] = data_dir

    model_fields = _model_fields()
    for name in cfg["model"]:
        if name not in model_fields:
            raise UsageError(f"unknown model setting model.{name}")
    if cfg["data"].get("task", "text") not in ("text", "chains"):
        raise UsageError(f"data.task must be 'text' or 'chains', got {cfg['data']['task']!r}")
    if cfg["data"].get("task", "text") == "text":  # chains settings are checked by training.sources
        for name in cfg["data"]:
            if name not in ("task", "dir", "vocab_size", "val_fraction"):
                raise UsageError(f"unknown data setting data.{name} (expected dir, vocab_size, val_fraction)")
    cfg["train"] = make_train_config(cfg["train"])
    return cfg


def make_train_config(values: dict) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        if name not in fields:
            raise UsageError(f"unknown train setting train.{name}")
        want = hints[name]
        ok = (
            isinstance(value, want)
            or (want is float and isinstance(value, int))
            or (want is list and isinstance(value, list))
        ) and not (want is not bool and isinstance(value, bool))
        if not ok:
            raise UsageError(f"train.{name} must be {want.__name__}, got {value!r}")
    tc = TrainConfig(**{k: (float(v) if hints[k] is float else v) for k, v in values.items()})
    tc.check()
    return tc


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


def config_to_dict(cfg: dict) -> dict:
    return {"data": cfg["data"], "model": cfg["model"], "train": dataclasses.asdict(cfg["train"])}
