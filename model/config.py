"""MeshConfig: one typed config for vanilla and recursive (Prelude-Recurrent-Coda) GPT-NeoX models.

The layout string is the paper's notation: ``P+CRK+D`` (e.g. ``2+4R2+2``: 2 prelude layers, 4 core
layers looped K=2 times, 2 coda layers); a plain number (``12``) is the vanilla model. Stored fields
are what a user sets; everything derived (layout, head size, layer counts per depth) is a property.
"""

from __future__ import annotations

import re

from transformers import PretrainedConfig

SCHEMES = ("vanilla", "base", "residual", "anchor", "anchor_emb", "mesh")
_LAYOUT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*R\s*(\d+)\s*\+\s*(\d+)\s*$")


class MeshConfig(PretrainedConfig):
    model_type = "mesh"

    # Pythia-style defaults (GPT-NeoX blocks). Dimensions are the only thing a Pythia size changes.
    vocab_size: int = 50304
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int | None = None  # None -> 4 * hidden_size
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    attention_bias: bool = True
    hidden_dropout: float = 0.0  # on attention and MLP outputs (GPT-NeoX names); training only
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    # Recursion
    n_prelude: int = 12
    n_core: int = 0
    n_coda: int = 0
    scheme: str = "vanilla"
    max_loops: int | None = None  # None -> default_loops
    default_loops: int = 1
    mesh_slots: int | None = None  # None -> max_loops + 3
    scale_embeddings: bool = False  # multiply embeddings by sqrt(d) (the paper's choice; off for NeoX parity)
    coda_read_routers: bool = False  # mesh: a final-read router per depth K for the coda's input

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.max_loops is None:
            self.max_loops = self.default_loops
        if self.mesh_slots is None:
            self.mesh_slots = self.max_loops + 3
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        def bad(msg: str):
            raise ValueError(f"invalid MeshConfig: {msg}")

        if self.scheme not in SCHEMES:
            bad(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        for name in ("n_prelude", "n_core", "n_coda"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.scheme == "vanilla":
            if self.n_core != 0 or self.n_coda != 0:
                bad("the vanilla scheme keeps all layers in the prelude (n_core = n_coda = 0)")
            if self.n_prelude < 1:
                bad("a vanilla model needs at least one layer")
            if self.max_loops != 1 or self.default_loops != 1:
                bad("a vanilla model has exactly one loop (max_loops = default_loops = 1)")
        elif self.n_core < 1:
            bad(f"scheme {self.scheme!r} needs at least one core layer")
        if not (isinstance(self.max_loops, int) and self.max_loops >= 1):
            bad(f"max_loops must be an integer >= 1, got {self.max_loops!r}")
        if not (isinstance(self.default_loops, int) and 1 <= self.default_loops <= self.max_loops):
            bad(f"default_loops must be in [1, max_loops={self.max_loops}], got {self.default_loops!r}")
        if self.scheme == "mesh" and (not isinstance(self.mesh_slots, int) or self.mesh_slots < 2):
            bad(f"mesh_slots must be an integer >= 2, got {self.mesh_slots!r}")
        if not isinstance(self.coda_read_routers, bool):
            bad(f"coda_read_routers must be true or false, got {self.coda_read_routers!r}")
        if self.coda_read_routers and self.scheme != "mesh":
            bad(f"coda_read_routers needs the mesh scheme (a buffer to read), got scheme {self.scheme!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            bad(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            bad(f"rotary dims (head_size * rotary_pct = {self.rotary_ndims}) must be even")

    # ---- the paper's layout notation ---------------------------------------------------------
    @classmethod
    def from_layout(cls, layout: str, scheme: str | None = None, **kwargs) -> "MeshConfig":
        """``from_layout("2+4R2+2", scheme="mesh", hidden_size=768, ...)``; ``"12"`` is vanilla."""
        text = str(layout).strip()
        if text.isdigit():
            if scheme not in (None, "vanilla"):
                raise ValueError(f"layout {text!r} is vanilla; scheme {scheme!r} needs a recursive layout like '2+4R2+2'")
            return cls(n_prelude=int(text), n_core=0, n_coda=0, scheme="vanilla", **kwargs)
        m = _LAYOUT_RE.match(text)
        if m is None:
            raise ValueError(f"cannot parse layout {layout!r}: expected 'P+CRK+D' (e.g. '2+4R2+2') or a plain layer count")
        p, c, k, d = map(int, m.groups())
        if k < 1:
            raise ValueError(f"layout {layout!r}: the loop count K must be >= 1")
        return cls(n_prelude=p, n_core=c, n_coda=d, default_loops=k, scheme=scheme or "mesh", **kwargs)

    @property
    def layout(self) -> str:
        if self.scheme == "vanilla":
            return str(self.n_prelude)
        return f"{self.n_prelude}+{self.n_core}R{self.default_loops}+{self.n_coda}"

    # ---- derived values --------------------------------------------------------------------
    @property
    def is_recursive(self) -> bool:
        return self.scheme != "vanilla"

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @property
    def num_hidden_layers(self) -> int:
        """Unique (parameterised) layers."""
        return self.n_prelude + self.n_core + self.n_coda

    def num_layer_applications(self, loops: int | None = None) -> int:
        """N(K) = P + K*C + D: layer applications (and KV-cache slots) of one call at depth K."""
        k = self.default_loops if loops is None else loops
        return self.n_prelude + k * self.n_core + self.n_coda

    def check_loops(self, loops: int) -> int:
        if isinstance(loops, bool) or not isinstance(loops, int) or not 1 <= loops <= self.max_loops:
            raise ValueError(f"loops must be an integer in [1, {self.max_loops}] for this model, got {loops!r}")
        return loops
