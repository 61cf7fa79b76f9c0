"""The MeSH recursive transformer (arXiv 2510.07739) on GPT-NeoX (Pythia) blocks, in one file.

    h_emb = embed(ids) [* sqrt(d)]
    h_pre = prelude(h_emb)                       # P unshared layers
    state = start(h_emb, h_pre)                  # state.h is h^(0)
    for t in range(K):                           # K = loops of THIS call, 1 <= K <= max_loops
        h_m   = core(state.h)                    # C shared layers
        state = step(t, state, h_m)              # the scheme sees h^(t), h_m and its own memory
    logits = head(ln_f(coda(state.h)))           # D unshared layers

Schemes: base h' = core(h); residual h' = core(h) + h; anchor h' = core(h) + h^(0);
anchor_emb h' = core(h) + h_emb; mesh: a per-token buffer of B slots with step-wise write/read
routers (see `Recurrence`). The vanilla model is the prelude alone.

The forward is composed of stages the server's engine also calls one by one (a draft at depth d keeps
the state after iteration d and a verify pass resumes from it):

    ctx   = model.layer_context(position_ids, mask, cache, past, K)
    state = model.start(model.embed(ids), ctx)   # embeddings + prelude -> h^(0) (+ the MeSH buffer)
    state = model.iterate(state, t0, t1, ctx)    # core iterations t0 .. t1-1
    logits = model.compute_logits(model.finish(state, ctx))   # coda, final norm, output embedding

Positions are explicit (``position_ids``) and the KV cache is an object with
``update(k, v, layer_idx, cache_kwargs)`` (see cache.py), or, for a paged cache that computes
attention over its own blocks, ``attend(q, k, v, cache_kwargs)``: HF ``generate()``, the eval loop and
the server's engine all go through these stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import MeshCache, kv_bytes_per_token, virtual_layer
from .config import MeshConfig


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (GPT-NeoX: partial rotary on the first rotary_pct of each head)
# ---------------------------------------------------------------------------------------------
def rotary_cos_sin(config: MeshConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    rd = config.rotary_ndims
    inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, rd, 2, device=position_ids.device).float() / rd))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, rd): broadcast over heads


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------
# GPT-NeoX block. Parameter names match Hugging Face's GPTNeoXLayer so conversion is a rename.
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.n_head, self.head_size = config.num_attention_heads, config.head_size
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.dense.is_residual_projection = True  # depth-scaled init
        self.dropout = config.attention_dropout

    def forward(self, x, cos, sin, mask, cache, layer_idx, cache_kwargs):
        B, T, C = x.shape
        # NeoX packs q, k, v per head: (B, T, nh, 3*hs)
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)  # (B, nh, T, 3hs)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, nh, T, hs) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            attend = getattr(cache, "attend", None)
            if attend is not None:  # a paged cache (the server's block pool) writes and attends itself
                return self.dense(attend(q, k, v, cache_kwargs).transpose(1, 2).reshape(B, T, C))
            k, v = cache.update(k, v, layer_idx, cache_kwargs)  # (B, nh, S, hs): past + current
        p = self.dropout if self.training else 0.0
        if mask is None:
            # No padding: plain causal attention (flash/efficient kernels), or a single query seeing all of S.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dense_4h_to_h.is_residual_projection = True

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class MeshLayer(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.hidden_dropout)

    def forward(self, h, cos, sin, mask, cache, layer_idx, cache_kwargs):
        drop = self.drop if self.training else _identity  # no dropout calls at all in eval
        a = drop(self.attention(self.input_layernorm(h), cos, sin, mask, cache, layer_idx, cache_kwargs))
        if self.use_parallel_residual:  # Pythia: x + attn(ln1(x)) + mlp(ln2(x))
            return h + a + drop(self.mlp(self.post_attention_layernorm(h)))
        h = h + a
        return h + drop(self.mlp(self.post_attention_layernorm(h)))


def _identity(x):
    return x


# ---------------------------------------------------------------------------------------------
# The recurrence schemes. State is a dict of (B, T, ...) tensors so a batch can be cut to its
# first n rows (rows of a mixed-depth batch are sorted by depth, deepest first).
# ---------------------------------------------------------------------------------------------
class Recurrence(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.scheme = config.scheme
        if self.scheme == "mesh":
            # Router pair 0 is the transitional write-read cycle; core step t uses pair t + 1.
            # All max_loops + 1 pairs exist whatever K a call uses.
            n_pairs, d, s = config.max_loops + 1, config.hidden_size, config.mesh_slots
            self.write_routers = nn.ModuleList(nn.Linear(d, s) for _ in range(n_pairs))
            self.read_routers = nn.ModuleList(nn.Linear(d, s) for _ in range(n_pairs))
            if config.coda_read_routers:
                # coda_routers[K - 1] reads the coda's input at depth K, so read router K keeps one job
                # (feeding core iteration K + 1) instead of also feeding the coda when a call stops at K.
                self.coda_routers = nn.ModuleList(nn.Linear(d, s) for _ in range(config.max_loops))

    fused = None  # fuse_routers(): per pair, the write and read routers as one (2S, D) Linear

    def fuse_routers(self) -> None:
        """For inference: each pair's write and read routers become one Linear(D -> 2S) and one softmax
        (half the router kernels per iteration). Checkpoints keep the two routers' keys; training must
        not call this (the fused copies would not follow the weights)."""
        if self.scheme == "mesh" and self.fused is None:  # once: compiled graphs hold on to these tensors
            self.fused = [(torch.cat((w.weight, r.weight)), torch.cat((w.bias, r.bias)))
                          for w, r in zip(self.write_routers, self.read_routers)]

    def _routes(self, pair: int, h_router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(write weights, read weights), each (B, T, S): softmaxes of the pair's two routers."""
        if self.fused is not None and not self.training:
            w = F.linear(h_router, *self.fused[pair])  # (B, T, 2S)
            w = w.unflatten(-1, (2, w.shape[-1] // 2)).softmax(dim=-1)  # (B, T, 2, S)
            return w[..., 0, :], w[..., 1, :]
        return F.softmax(self.write_routers[pair](h_router), dim=-1), F.softmax(self.read_routers[pair](h_router), dim=-1)

    def _write_read(self, pair: int, mem: torch.Tensor, h_router: torch.Tensor, h_write: torch.Tensor):
        w_w, w_r = self._routes(pair, h_router)  # (B, T, S) each
        mem = mem + w_w.unsqueeze(-1) * h_write.unsqueeze(-2)  # (B, T, S, D): m_b += h * w_w,b
        h = (w_r.unsqueeze(-2) @ mem).squeeze(-2)  # (B, T, 1, S) @ (B, T, S, D) -> (B, T, D)
        return mem, h

    def start(self, h_emb: torch.Tensor, h_pre: torch.Tensor) -> dict:
        if self.scheme == "mesh":
            B, T, D = h_emb.shape
            mem = h_emb.new_zeros(B, T, self.write_routers[0].out_features, D)  # (B, T, S, D)
            mem[:, :, 0] = h_emb  # m_0 = h_emb, other slots 0
            mem, h = self._write_read(0, mem, h_pre, h_pre)
            return {"h": h, "mem": mem}
        if self.scheme == "anchor":
            return {"h": h_pre, "anchor": h_pre}
        if self.scheme == "anchor_emb":
            return {"h": h_pre, "anchor": h_emb}
        return {"h": h_pre}

    def step(self, t: int, state: dict, h_m: torch.Tensor) -> dict:
        if self.scheme == "mesh":
            mem, h = self._write_read(t + 1, state["mem"], state["h"], h_m)
            return {"h": h, "mem": mem}
        if self.scheme == "residual":
            return {"h": h_m + state["h"]}
        if self.scheme in ("anchor", "anchor_emb"):
            return {"h": h_m + state["anchor"], "anchor": state["anchor"]}
        return {"h": h_m}  # base

    def read_out(self, state: dict, loops: int) -> torch.Tensor:
        """The coda's input after `loops` core iterations: h^(K), the last read, or with
        config.coda_read_routers a read of the buffer by depth K's own router (input h^(K))."""
        if not hasattr(self, "coda_routers"):
            return state["h"]
        w_r = F.softmax(self.coda_routers[loops - 1](state["h"]), dim=-1)  # (B, T, S)
        return (w_r.unsqueeze(-2) @ state["mem"]).squeeze(-2)  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerContext:
    """Per-call inputs of every layer application: rotary tables (B, 1, T, rd), the attention mask
    (B, 1, T, S) or None, the cache, positions already cached, the call's depth K and per-row depths."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: object
    past: int
    loops: int
    row_loops: list[int] | None = None


class MeshPreTrainedModel(PreTrainedModel):
    config_class = MeshConfig
    config: MeshConfig
    base_model_prefix = "mesh"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MeshLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "is_residual_projection", False):
            # The paper's depth-aware init: std / sqrt(2 * N_compute), N_compute = P + K*C + D at the default depth.
            n_compute = self.config.num_layer_applications()
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * n_compute))


def _loops_per_row(config: MeshConfig, loops, batch: int):
    """Returns (K, per-row depths or None). A per-row list must be sorted deepest first."""
    if loops is None:
        return config.default_loops, None
    if torch.is_tensor(loops) and loops.dim() == 0:
        loops = loops.item()
    if not isinstance(loops, (list, tuple)) and not torch.is_tensor(loops):
        return config.check_loops(loops), None  # an int, or a clear error naming the range
    if torch.is_tensor(loops) and (loops.dim() != 1 or loops.is_floating_point()):
        raise ValueError(f"per-row loops must be a 1D integer tensor, got shape {tuple(loops.shape)} {loops.dtype}")
    rows = loops.tolist() if torch.is_tensor(loops) else list(loops)
    if len(rows) != batch:
        raise ValueError(f"per-row loops has {len(rows)} entries for a batch of {batch}")
    for k in rows:
        config.check_loops(k)
    if any(a < b for a, b in zip(rows, rows[1:])):
        raise ValueError("per-row loops must be sorted deepest first (non-increasing)")
    return rows[0], rows


class MeshForCausalLM(MeshPreTrainedModel, GenerationMixin):
    # Only used when config.tie_word_embeddings is True (e.g. a converted tied GPT-NeoX); off by default.
    _tied_weights_keys = {"embed_out.weight": "embed_in.weight"}

    def __init__(self, config: MeshConfig):
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList(MeshLayer(config) for _ in range(config.n_prelude))
        self.core = nn.ModuleList(MeshLayer(config) for _ in range(config.n_core))
        self.coda = nn.ModuleList(MeshLayer(config) for _ in range(config.n_coda))
        self.recurrence = Recurrence(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def get_output_embeddings(self):
        return self.embed_out

    def set_output_embeddings(self, value):
        self.embed_out = value

    # ---- bookkeeping ------------------------------------------------------------------------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Pythia convention: ``exclude_embeddings`` drops the input embedding and the (untied) output embedding."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.embed_in.weight), id(self.embed_out.weight)}
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in skip or id(p) in seen or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def kv_bytes_per_token(self, loops: int | None = None, dtype: torch.dtype | None = None) -> int:
        return kv_bytes_per_token(self.config, loops, dtype or self.dtype)

    # ---- forward ----------------------------------------------------------------------------
    def _attention_mask(self, attention_mask, B, T, past, device):
        """Bool (B, 1, T, S) mask (True = attend), or None when plain causal attention is exact."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # prepared by the caller (the server's pool)
        S = past + T
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0 or T == 1:
                return None  # is_causal / attend-to-all
            key_valid = torch.ones(B, S, dtype=torch.bool, device=device)
        else:
            key_valid = attention_mask.bool()  # (B, S): forward() checked its shape
        q_pos = torch.arange(past, S, device=device)  # (T,)
        k_pos = torch.arange(S, device=device)  # (S,)
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
        # A padding query still sees itself, so no row is fully masked (that would give NaN, and NaN
        # values times zero weights would leak into real rows of later layers).
        own = k_pos[None, :] == q_pos[:, None]
        return (key_valid[:, None, None, :] & causal) | own  # (B, 1, T, S)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MeshCache | None = None,
        use_cache: bool | None = None,
        loops=None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the pre-5.x name
        if input_ids is None:
            raise ValueError("input_ids is required")
        cfg = self.config
        B, T = input_ids.shape
        K, row_loops = _loops_per_row(cfg, loops, B)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training and row_loops is None:
            cache = MeshCache(cfg, K)
        if isinstance(cache, MeshCache):
            if row_loops is not None:
                raise ValueError("MeshCache holds one depth; per-row loops need a pool cache (see server/)")
            if cache.loops != K:
                raise ValueError(f"this cache was built for loops={cache.loops}, the call asks loops={K}")
        past = cache_position if cache_position is not None else (cache.get_seq_length() if cache is not None else 0)
        if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != (B, past + T):
            # Checked here, not only when there is padding: positions are derived from this mask, and a
            # mask over the new tokens alone would silently restart them at 0.
            raise ValueError(
                f"a 2D attention_mask covers past + new tokens: expected shape {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )

        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)

        ctx = self.layer_context(position_ids, attention_mask, cache, past, K, row_loops)
        hidden = [] if output_hidden_states else None
        state = self.start(self.embed(input_ids), ctx, hidden)
        state = self.iterate(state, 0, K, ctx, hidden)
        h = self.finish(state, ctx)
        if hidden is not None:
            hidden.append(h)
        logits = self.compute_logits(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T or logits_to_keep, V)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )

    # ---- stages: forward = start -> iterate(0, K) -> finish -> compute_logits ----------------------
    # The engine calls them separately: a draft at depth d runs iterate(0, d) and keeps the state;
    # verifying resumes with iterate(d, K). Core iteration t computes the same whatever K is.
    def layer_context(self, position_ids, attention_mask=None, cache=None, past: int = 0, loops: int | None = None,
                      row_loops=None) -> "LayerContext":
        """What every layer application of one call needs besides h: rotary tables, mask, cache, depths."""
        K = self.config.default_loops if loops is None else loops
        cos, sin = self._rotary(position_ids)  # (B, 1, T, rd)
        B, T = position_ids.shape
        mask = self._attention_mask(attention_mask, B, T, past, position_ids.device)
        return LayerContext(cos, sin, mask, cache, past, K, row_loops)

    def _rotary(self, position_ids: torch.Tensor):
        """rotary_cos_sin, looked up in a table of every position computed once per device and dtype."""
        dtype, n = self.embed_in.weight.dtype, self.config.max_position_embeddings
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].device != position_ids.device or table[0].dtype != dtype:
            every = torch.arange(n, device=position_ids.device)[None]
            table = self._rope_table = tuple(t[0, 0] for t in rotary_cos_sin(self.config, every, dtype))  # (n, rd) each
        # past the table, compute (it is only a cache); checked on CPU only, where it costs no device sync,
        # and not inside a compiled graph (the engine's positions are below max_position_embeddings)
        if position_ids.device.type == "cpu" and not torch.compiler.is_compiling() and position_ids.numel() \
                and int(position_ids.max()) >= n:
            return rotary_cos_sin(self.config, position_ids, dtype)
        return table[0][position_ids][:, None], table[1][position_ids][:, None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h_emb = self.embed_in(input_ids)  # (B, T, D)
        return h_emb * math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else h_emb

    def start(self, h_emb: torch.Tensor, ctx: "LayerContext", hidden: list | None = None) -> dict:
        """Embeddings -> prelude -> the recurrence state before core iteration 0 (state["h"] is h^(0))."""
        h_pre = self._run(self.prelude, h_emb, ctx, "prelude")
        state = self.recurrence.start(h_emb, h_pre) if self.config.is_recursive else {"h": h_pre}
        if hidden is not None:
            hidden += [h_emb, state["h"]]
        return state

    def iterate(self, state: dict, t0: int, t1: int, ctx: "LayerContext", hidden: list | None = None) -> dict:
        """Core iterations t0 .. t1-1 from `state`. With per-row depths (rows sorted deepest first) iteration
        t runs only the prefix of rows with loops > t; the other rows' state passes through unchanged."""
        if not self.config.is_recursive:
            return state
        B = state["h"].shape[0]
        for t in range(t0, t1):
            n = B if ctx.row_loops is None else sum(k > t for k in ctx.row_loops)
            sub = state if n == B else {name: v[:n] for name, v in state.items()}
            sub = self.recurrence.step(t, sub, self._run(self.core, sub["h"], ctx, "core", t))
            state = sub if n == B else {name: torch.cat((v, state[name][n:])) for name, v in sub.items()}
            if hidden is not None:
                hidden.append(state["h"])
        return state

    def finish(self, state: dict, ctx: "LayerContext") -> torch.Tensor:
        """The recurrence state after K iterations -> coda output (B, T, D), before the final norm."""
        if not self.config.is_recursive:
            h = state["h"]
        elif ctx.row_loops is None or not self.config.coda_read_routers:
            h = self.recurrence.read_out(state, ctx.loops)
        else:  # per-depth final reads: each group of equal depth (rows are sorted) reads with its own router
            groups = [(k, ctx.row_loops.index(k), len(ctx.row_loops) - ctx.row_loops[::-1].index(k))
                      for k in dict.fromkeys(ctx.row_loops)]
            h = torch.cat([self.recurrence.read_out({n: v[a:b] for n, v in state.items()}, k) for k, a, b in groups])
        return self._run(self.coda, h, ctx, "coda")

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Coda outputs (..., D) -> logits (..., V): the final norm and the output embedding."""
        return self.embed_out(self.final_layer_norm(h))

    def _run(self, layers, h: torch.Tensor, ctx: "LayerContext", stage: str, t: int = 0) -> torch.Tensor:
        n = h.shape[0]  # the rows of this stage (a prefix of the batch)
        m = None if ctx.mask is None else ctx.mask[:n]
        for j, layer in enumerate(layers):
            kw = {"cache_position": ctx.past, "stage": stage, "index": j, "iteration": t, "rows": n}
            layer_idx = virtual_layer(self.config, stage, j, t, ctx.loops)
            h = layer(h, ctx.cos[:n], ctx.sin[:n], m, ctx.cache, layer_idx, kw)
        return h

    # ---- generate() integration -------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        # One slot per layer application at this call's depth, preallocated to the generation length.
        model_kwargs["cache"] = MeshCache(self.config, model_kwargs.get("loops"), max_cache_len=max_cache_length)
