"""MeSH recursive transformers: ``from model import MeshConfig, MeshForCausalLM``.

Importing this package registers ``model_type = "mesh"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` works.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MeshCache, kv_bytes_per_token, virtual_layer
from .config import SCHEMES, MeshConfig
from .modeling import MeshForCausalLM

AutoConfig.register("mesh", MeshConfig, exist_ok=True)
AutoModelForCausalLM.register(MeshConfig, MeshForCausalLM, exist_ok=True)

__all__ = ["MeshConfig", "MeshForCausalLM", "MeshCache", "SCHEMES", "kv_bytes_per_token", "virtual_layer"]
