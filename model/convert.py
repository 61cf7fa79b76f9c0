"""Convert between Hugging Face GPT-NeoX (Pythia) and vanilla MeSH models.

A vanilla MeSH model (layout ``"12"``) is a GPT-NeoX model with the layers kept in ``prelude``; the
block parameter names already match Hugging Face's ``GPTNeoXLayer``, so conversion is a rename:

    gpt_neox.embed_in.*          <-> embed_in.*
    gpt_neox.layers.{i}.*        <-> prelude.{i}.*
    gpt_neox.final_layer_norm.*  <-> final_layer_norm.*
    lm_head.weight               <-> embed_out.weight

This is how a user starts from Pythia weights (downloaded elsewhere), and it is the reference test
of our blocks: the converted model's logits match Hugging Face's implementation.

    python -m model.convert --from-gpt-neox pythia-160m/ --out pythia-160m-mesh/
    python -m model.convert --to-gpt-neox pythia-160m-mesh/ --out pythia-160m-neox/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from .config import MeshConfig
from .modeling import MeshForCausalLM

# Config fields that mean the same thing under the same name in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "use_parallel_residual",
    "layer_norm_eps",
    "max_position_embeddings",
    "initializer_range",
    "attention_bias",
    "hidden_dropout",
    "attention_dropout",
    "tie_word_embeddings",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

# Tokenizer files travel with the weights so the converted directory is usable on its own.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _neox_to_mesh_key(key: str) -> str:
    if key == "lm_head.weight":
        return "embed_out.weight"
    if key.startswith("gpt_neox.layers."):
        return "prelude." + key[len("gpt_neox.layers.") :]
    if key.startswith("gpt_neox."):
        return key[len("gpt_neox.") :]
    raise ValueError(f"unexpected GPT-NeoX parameter {key!r}")


def _mesh_to_neox_key(key: str) -> str:
    if key == "embed_out.weight":
        return "lm_head.weight"
    if key.startswith("prelude."):
        return "gpt_neox.layers." + key[len("prelude.") :]
    return "gpt_neox." + key  # embed_in.*, final_layer_norm.*


def _load_renamed(target: torch.nn.Module, source: torch.nn.Module, rename) -> None:
    """Copy every source tensor into the target under its new name; both key sets must match exactly."""
    state = {rename(k): v for k, v in source.state_dict().items()}
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"parameter names do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    target.load_state_dict(state, strict=True)


def _finish(target: torch.nn.Module, source: torch.nn.Module) -> None:
    # Weights were copied in float32; end in the source's dtype, device and train/eval mode.
    target.to(device=source.device, dtype=source.dtype)
    target.train(source.training)


def mesh_config_from_gpt_neox(config: GPTNeoXConfig) -> MeshConfig:
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE converts to MeSH; this GPT-NeoX config uses rope_type {rope['rope_type']!r}")
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        raise ValueError("MeSH needs head_dim = hidden_size / num_attention_heads")
    return MeshConfig.from_layout(
        str(config.num_hidden_layers),
        rotary_pct=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_emb_base=float(rope["rope_theta"]),
        **{name: getattr(config, name) for name in _SHARED_FIELDS},
    )


def gpt_neox_config_from_mesh(config: MeshConfig) -> GPTNeoXConfig:
    if config.is_recursive:
        raise ValueError(
            f"to_gpt_neox needs a vanilla layout (a plain layer count such as '12'); this model is "
            f"{config.layout!r} with scheme {config.scheme!r}, whose shared core and recurrence have no GPT-NeoX equivalent"
        )
    if config.scale_embeddings:
        raise ValueError("to_gpt_neox: GPT-NeoX does not scale embeddings by sqrt(d); this model has scale_embeddings=True")
    return GPTNeoXConfig(
        num_hidden_layers=config.n_prelude,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rotary_emb_base,
            "partial_rotary_factor": config.rotary_pct,
        },
        **{name: getattr(config, name) for name in _SHARED_FIELDS},
    )


def from_gpt_neox(neox: GPTNeoXForCausalLM) -> MeshForCausalLM:
    """A vanilla ``MeshForCausalLM`` computing the same function as a Hugging Face GPT-NeoX model."""
    if not isinstance(neox, GPTNeoXForCausalLM):
        raise ValueError(f"from_gpt_neox expects a GPTNeoXForCausalLM, got {type(neox).__name__}")
    mesh = MeshForCausalLM(mesh_config_from_gpt_neox(neox.config))
    _load_renamed(mesh, neox, _neox_to_mesh_key)
    _finish(mesh, neox)
    return mesh


def to_gpt_neox(mesh: MeshForCausalLM) -> GPTNeoXForCausalLM:
    """A Hugging Face ``GPTNeoXForCausalLM`` from a vanilla MeSH model; recursive layouts raise ValueError."""
    if not isinstance(mesh, MeshForCausalLM):
        raise ValueError(f"to_gpt_neox expects a MeshForCausalLM, got {type(mesh).__name__}")
    neox = GPTNeoXForCausalLM(gpt_neox_config_from_mesh(mesh.config))
    _load_renamed(neox, mesh, _mesh_to_neox_key)
    _finish(neox, mesh)
    return neox


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    copied = []
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.convert",
        description=(
            "Convert a Hugging Face GPT-NeoX (Pythia) checkpoint directory into a vanilla MeSH checkpoint, "
            "or back. Weights keep their dtype; tokenizer files in the source directory are copied along. "
            "Only vanilla (non-recursive) MeSH layouts convert to GPT-NeoX."
        ),
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-gpt-neox", metavar="DIR", type=Path, help="GPT-NeoX checkpoint directory to read")
    src.add_argument("--to-gpt-neox", metavar="DIR", type=Path, help="vanilla MeSH checkpoint directory to read")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="directory to write (created if missing)")
    args = parser.parse_args(argv)

    source = args.from_gpt_neox or args.to_gpt_neox
    if not (source / "config.json").is_file():
        parser.error(f"{source} is not a checkpoint directory (no config.json)")
    # Checked up front: from_pretrained would load a mismatched checkpoint with randomly initialised weights.
    want = "gpt_neox" if args.from_gpt_neox else "mesh"
    try:
        found = json.loads((source / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {source / 'config.json'}: {exc}")
    if found != want:
        parser.error(f"{source} holds a {found!r} checkpoint; this direction reads model_type {want!r}")
    try:
        if args.from_gpt_neox:
            converted = from_gpt_neox(GPTNeoXForCausalLM.from_pretrained(source))
        else:
            converted = to_gpt_neox(MeshForCausalLM.from_pretrained(source))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # One line, no traceback: a wrong model type or a recursive layout is a user error.
        parser.exit(2, f"{parser.prog}: error: cannot convert {source}: {exc}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    converted.save_pretrained(args.out)
    copied = _copy_tokenizer(source, args.out)
    kind = "MeSH" if args.from_gpt_neox else "GPT-NeoX"
    extra = f" (+ {', '.join(copied)})" if copied else ""
    print(f"wrote {kind} checkpoint to {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
