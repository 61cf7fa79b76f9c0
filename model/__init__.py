"""MeSH recursive transformers: ``from model import MeshConfig, MeshForCausalLM``.

Importing this package registers ``model_type = "mesh"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` works.
"""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MeshCache, kv_bytes_per_token, num_paged_slots, paged_slot, tiers, virtual_layer
from .config import SCHEMES, MeshConfig
from .modeling import MeshForCausalLM

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"  # the embedded default checkpoint

AutoConfig.register("mesh", MeshConfig, exist_ok=True)
AutoModelForCausalLM.register(MeshConfig, MeshForCausalLM, exist_ok=True)

__all__ = ["DEFAULT_MODEL", "MeshConfig", "MeshForCausalLM", "MeshCache", "SCHEMES", "kv_bytes_per_token", "num_paged_slots", "paged_slot", "tiers", "virtual_layer"]
