"""Loading the checkpoint the operator named, safely: safetensors only (never pickle), checked before use.

    model, tokenizer = load_checkpoint(path, device, dtype)     # ValueError: one line naming file and problem

Checked, each with a one-line error that names the file: the directory and its config.json /
tokenizer.json exist and parse; the weights are safetensors (a pickle-only checkpoint such as
pytorch_model.bin is refused, since unpickling runs code); every safetensors file has a readable
header and is as long as the header says (a truncated copy fails here); the tensors are exactly the
ones the config needs, with the right shapes (transformers would otherwise fill a missing tensor
with random values and only warn); and every weight is finite.

The path only ever comes from the operator (--model / MESH_MODEL): a request's `model` field is a
name compared with the served name, never a path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import MeshConfig, MeshForCausalLM

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt", "model.pkl")


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_config(path: Path) -> MeshConfig:
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"{file}: missing (expected a checkpoint saved with save_pretrained plus its tokenizer)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MeshConfig.model_type:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{file}: model_type is {got!r}, not {MeshConfig.model_type!r} (not a MeSH checkpoint)")
    try:
        return MeshConfig.from_pretrained(str(path))
    except Exception as e:  # the config's own validation (layout, sizes, loops)
        raise ValueError(f"{file}: invalid config ({one_line(e)})") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards its index lists)."""
    single, index = path / WEIGHTS, path / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({one_line(e)})") from None
        files = [path / s for s in shards]
        missing = [f for f in files if not f.is_file() or f.parent != path]
        if missing:
            raise ValueError(f"{index}: lists {missing[0].name}, which is not in {path}")
        return files
    pickled = [n for n in PICKLE_WEIGHTS if (path / n).exists()]
    if pickled:
        raise ValueError(f"{path / pickled[0]}: pickle weights are refused (loading them can run code); "
                         f"convert the checkpoint to {WEIGHTS} (save_pretrained writes safetensors)")
    raise ValueError(f"{path}: no {WEIGHTS} (or {WEIGHTS_INDEX}) found")


def read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; the reader also checks the file is as long as the header says."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError: bad/too large header, truncated data, ...
        raise ValueError(f"{file}: not a valid safetensors file ({one_line(e)})") from None


def check_tensors(config: MeshConfig, files: list[Path]) -> None:
    """The checkpoint holds exactly the tensors the config needs, with their shapes."""
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in MeshForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:  # the output embedding is the input one: save_pretrained writes it once
        for tied in (MeshForCausalLM._tied_weights_keys or {}):
            expected.pop(tied, None)
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        for name, shape in read_shapes(file).items():
            found[name] = (shape, file)
    where = files[0] if len(files) == 1 else files[0].parent
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{where}: does not match config.json: tensor {missing[0]}{more} missing")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(f"{found[unexpected[0]][1]}: does not match config.json: unexpected tensor {unexpected[0]}{more}")
    for name, want in expected.items():
        shape, file = found[name]
        if shape != want:
            raise ValueError(f"{file}: does not match config.json: tensor {name} has shape {list(shape)}, "
                             f"the config needs {list(want)}")


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    file = path / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{file}: missing (expected a checkpoint saved with save_pretrained plus its tokenizer)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as e:
        raise ValueError(f"{file}: cannot be loaded ({one_line(e)})") from None


def load_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint directory, checked as the module docstring says."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    config = read_config(path)
    files = weight_files(path)
    check_tensors(config, files)
    tokenizer = load_tokenizer(path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr stays clean: an error is the last and only line
    try:
        model = MeshForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except Exception as e:
        raise ValueError(f"{files[0]}: cannot be loaded ({one_line(e)})") from None
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{files[0] if len(files) == 1 else path}: tensor {name} holds NaN or infinite values")
    return model.to(device).eval(), tokenizer
