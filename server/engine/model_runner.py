"""Runs the model for one scheduled step: builds ids, positions and block tables, calls the model's
stages through the paged cache, and returns the logits the step samples from.

A step's rows are decode rows (one token: the one sampled last, the last token of a prompt, or a
draft token of a speculation round, at the draft depth), prompt chunks (several tokens of one
sequence), or verify passes (a round's drafts resumed from their saved recurrence states). Decode rows run together as one (n, 1) batch,
sorted deepest first so core iteration t runs only the rows with loops > t; each chunk runs as its
own (1, T) forward. A step's token budget bounds the chunks, so a long prompt never stalls the
running streams for long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import MeshForCausalLM

from .compiled import CompiledDecoder
from .kv_cache import PagedKVCache
from .sequence import Sequence


@dataclass
class RunOutput:
    """`logits[i]` is the next-token distribution of `seqs[i]` (rows that computed their last known
    token, or a draft token); `verify[seq]` the depth-K logits (g, V) of a verify pass;
    `prompt_logits[seq] = (start, logits (T, V))` for chunks of prompts that want logprobs."""

    seqs: list[Sequence] = field(default_factory=list)
    logits: torch.Tensor | None = None
    verify: dict = field(default_factory=dict)
    prompt_logits: dict = field(default_factory=dict)

    @staticmethod
    def merge(parts: list["RunOutput"]) -> "RunOutput":
        out = RunOutput()
        for part in parts:
            out.seqs += part.seqs
            out.verify.update(part.verify)
            out.prompt_logits.update(part.prompt_logits)
        logits = [p.logits for p in parts if p.logits is not None]
        out.logits = torch.cat(logits) if logits else None
        return out


class ModelRunner:
    def __init__(self, model: MeshForCausalLM, kv: PagedKVCache, draft_loops: int = 0, compiled: CompiledDecoder | None = None,
                 spec_tokens: int = 0):
        self.model, self.kv = model, kv
        self.device = kv.kv.device
        self.draft_loops = draft_loops  # the depth speculation drafts at (0: off)
        self.spec_tokens = spec_tokens  # drafts per full round: the only verify length that gets a graph
        self.compiled = compiled  # --compile: graphs for decode batches of one depth (compiled.py)

    @torch.inference_mode()
    def run(self, rows: list[tuple[Sequence, int]]) -> RunOutput:
        """rows: (sequence, tokens this step computes). K/V of those tokens land in the pool; the caller
        advances num_computed. A sequence in a speculation round runs one draft token at the draft depth
        (its recurrence state after that depth is kept), or the verify pass over its drafts."""
        out = RunOutput()
        decode = sorted((s for s, n in rows if self.is_decode(s, n)), key=lambda s: -self.depth(s))
        parts = []
        if decode:
            parts.append(self.decode(decode))
            out.seqs += decode
        verifying = sorted((s for s, _ in rows if s.verifying), key=lambda s: -s.loops)
        for g in dict.fromkeys(s.spec_tokens for s in verifying):  # one forward per draft length
            group = [s for s in verifying if s.spec_tokens == g]
            out.verify.update(zip(group, self.verify(group)))
        for seq, n in rows:
            if seq.verifying:
                continue
            elif not self.is_decode(seq, n):
                last, prompt = self.chunk(seq, n)
                if last is not None:
                    parts.append(last)
                    out.seqs.append(seq)
                if prompt is not None:
                    out.prompt_logits[seq] = (seq.num_computed, prompt)
        if parts:
            out.logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out

    @staticmethod
    def is_decode(seq: Sequence, n: int) -> bool:
        """A one-token row that samples next: a draft, or the sequence's last known token (a one-token
        piece of a prompt is a chunk: it must not sample)."""
        if seq.spec_tokens:
            return not seq.verifying
        return n == 1 and seq.num_computed + 1 == seq.num_tokens and not seq.wants_prompt_logprobs

    def depth(self, seq: Sequence) -> int:
        """Core iterations of a one-token step: the draft depth in a speculation round, else the request's."""
        return self.draft_loops if seq.spec_tokens else seq.loops

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, loops: int, row_loops, keep_all: bool):
        """-> (logits (T, V) or (B, V), the recurrence state after each row's last iteration)."""
        m = self.model
        ctx = m.layer_context(positions, cache=self.kv, loops=loops, row_loops=row_loops)
        state = m.iterate(m.start(m.embed(ids), ctx), 0, loops, ctx)
        h = m.finish(state, ctx)  # (B, T, D)
        return m.compute_logits(h[0] if keep_all else h[:, -1]), state

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row (`seqs` deepest first) -> logits (n, V). Draft rows keep their state."""
        n, bs = len(seqs), self.kv.block_size
        inputs = [s.next_input() for s in seqs]
        ids = torch.tensor([t for t, _ in inputs], device=self.device).view(n, 1)
        positions = [p for _, p in inputs]
        pos = torch.tensor(positions, device=self.device)
        nb = max(positions) // bs + 1
        tables = torch.stack([s.table for s in seqs]).to(self.device)  # (n, slots, max_blocks)
        self.kv.begin_decode(tables[:, :, :nb], pos)
        depths = [self.depth(s) for s in seqs]
        if any(s.auto for s in seqs):
            return self._decode_adaptive(seqs, ids, pos.view(n, 1), depths)
        row_loops = None if depths[0] == depths[-1] else depths
        if row_loops is None and self._compiled_ready(n, depths[0]):
            logits, state = self.compiled.run(ids, pos.view(n, 1), tables, self.kv.write_index, depths[0])
            logits = logits[:, -1]
        else:
            logits, state = self._forward(ids, pos.view(n, 1), depths[0], row_loops, keep_all=False)
        for i, seq in enumerate(seqs):
            if seq.spec_tokens:  # the draft input's state after the draft depth: where verify resumes
                seq.draft_states.append({name: v[i : i + 1].clone() for name, v in state.items()})
        return logits

    def _compiled_ready(self, n: int, loops: int, t0: int = 0, T: int = 1) -> bool:
        """Whether a compiled graph runs this one-depth batch (a decode step, or verify passes from the draft
        depth t0 with T drafts); if not, asks for one (eager serves meanwhile)."""
        if self.compiled is None or not self.compiled.covers(n):
            return False
        if self.compiled.ready(n, loops, t0, T):
            return True
        self.compiled.want(n, loops, t0, T)
        return self.compiled.ready(n, loops, t0, T)  # compiled in this thread (CUDA): ready now

    def _decode_adaptive(self, seqs: list[Sequence], ids, positions, depths: list[int]) -> torch.Tensor:
        """A decode step with `loops: "auto"` rows: core iteration t runs on the rows still iterating (any
        subset, not a prefix), and an auto row stops after t + 1 iterations (t + 1 >= min_loops) once its
        criterion (AutoDepth) says its state has converged. The K/V of the iterations it skipped are filled with those
        of its last iteration, so later, deeper tokens can attend to it. Rows whose criterion reads the
        next-token distribution keep the logits of their last check: the exit iteration's are their output."""
        m, n = self.model, len(seqs)
        ctx = m.layer_context(positions, cache=self.kv, loops=depths[0])
        state = m.start(m.embed(ids), ctx)
        exits, active = list(depths), list(range(n))
        checked: dict[int, torch.Tensor] = {}  # row -> logits (V,) after the last iteration it checked
        for t in range(max(depths)):
            active = [r for r in active if t < exits[r]]
            if not active:
                break
            state, before, after = self._iteration(state, active, ctx, t)
            for r in self._converged(seqs, active, before, after, ctx=ctx, t=t, checked=checked):
                exits[r] = t + 1
        self.kv.row_index = None
        for i, (seq, e) in enumerate(zip(seqs, exits)):
            seq.last_exit = e
            if seq.spec_tokens:  # a draft row in the same batch keeps its state, as in decode()
                seq.draft_states.append({name: v[i : i + 1].clone() for name, v in state.items()})
        self._fill_skipped(seqs, exits)
        rest = [r for r in range(n) if r not in checked]  # rows whose output is not a check's
        if len(rest) == n:
            return m.compute_logits(m._run(m.coda, self._read_out(state, exits, ctx), ctx, "coda")[:, -1])
        if rest:
            idx = torch.tensor(rest, device=self.device)
            h = self._read_out({name: v.index_select(0, idx) for name, v in state.items()}, [exits[r] for r in rest], ctx)
            checked.update(zip(rest, m.compute_logits(self._layers_rows("coda", h, ctx, 0, idx)[:, -1])))
            self.kv.row_index = None
        return torch.stack([checked[r] for r in range(n)])

    def _iteration(self, state: dict, active: list[int], ctx, t: int):
        """Core iteration t on batch rows `active` -> (the whole batch's state, then the active rows'
        state before and after the iteration)."""
        m, n = self.model, state["h"].shape[0]
        if active[-1] == len(active) - 1:  # a prefix of the batch (always at batch 1): no gathers
            k = len(active)
            self.kv.row_index = None
            sub = {name: v[:k] for name, v in state.items()}
            new = m.recurrence.step(t, sub, m._run(m.core, sub["h"], ctx, "core", t))
            return {name: torch.cat((v, state[name][k:])) if k < n else v for name, v in new.items()}, sub, new
        idx = torch.tensor(active, device=self.device)
        sub = {name: v.index_select(0, idx) for name, v in state.items()}
        new = m.recurrence.step(t, sub, self._layers_rows("core", sub["h"], ctx, t, idx))
        return {name: state[name].index_copy(0, idx, v) for name, v in new.items()}, sub, new

    def _converged(self, seqs: list[Sequence], active: list[int], before: dict, after: dict, *, ctx, t: int,
                   checked: dict) -> list[int]:
        """The auto rows of `active` that stop after iteration t. "change" rows compare h before and after;
        "confidence" and "kl" rows run the coda and the head at depth t + 1 (from one iteration before
        min_loops for "kl", which compares with the previous check) and leave the logits in `checked`."""
        autos = [(i, r, seqs[r].auto) for i, r in enumerate(active) if seqs[r].auto is not None]
        by_change = [(i, r, a) for i, r, a in autos if a.exit_criterion == "change" and t + 1 >= a.min_loops]
        stop = []
        if by_change:
            change = ((after["h"] - before["h"]).norm(dim=-1) / before["h"].norm(dim=-1).clamp(min=1e-12)).view(-1).tolist()
            stop = [r for i, r, a in by_change if change[i] < a.threshold]
        probe = [(i, r, a) for i, r, a in autos if a.exit_criterion != "change" and t + 1 >= a.min_loops - (a.exit_criterion == "kl")]
        if not probe:
            return stop
        logits = self._check_logits(after, [i for i, _, _ in probe], [r for _, r, _ in probe], ctx=ctx, t=t)  # (len(probe), V)
        lp = logits.float().log_softmax(-1)
        if any(a.exit_criterion == "kl" for _, _, a in probe):
            prev = torch.stack([checked.get(r, logits[j]) for j, (_, r, _) in enumerate(probe)]).float().log_softmax(-1)
            kl = (lp.exp() * (lp - prev)).sum(-1).clamp(min=0)  # KL(p_t || p_{t-1}) (float32 rounding can dip below 0); 0 with no previous check
            is_kl = torch.tensor([a.exit_criterion == "kl" for _, _, a in probe], device=lp.device)
            score = torch.where(is_kl, kl, lp.amax(-1).exp())
        else:
            score = lp.amax(-1).exp()  # the top probability
        for j, ((_, r, a), v) in enumerate(zip(probe, score.tolist())):
            done = v >= a.threshold if a.exit_criterion == "confidence" else (r in checked and v < a.threshold)
            checked[r] = logits[j]
            if done and t + 1 >= a.min_loops:
                stop.append(r)
        return stop

    def _check_logits(self, after: dict, pos: list[int], rows: list[int], *, ctx, t: int) -> torch.Tensor:
        """Depth-(t + 1) logits of batch rows `rows` (at `pos` in the active rows' state `after`): the
        final read, the coda (its K/V written, so an exit here leaves the right coda K/V) and the head."""
        m = self.model
        if pos == rows == list(range(len(rows))):  # a prefix of the batch (always at batch 1): no gathers
            self.kv.row_index = None
            part = {name: v[: len(rows)] for name, v in after.items()}
            return m.compute_logits(m._run(m.coda, m.recurrence.read_out(part, t + 1), ctx, "coda")[:, -1])
        part = {name: v.index_select(0, torch.tensor(pos, device=self.device)) for name, v in after.items()}
        h = self._layers_rows("coda", m.recurrence.read_out(part, t + 1), ctx, 0, torch.tensor(rows, device=self.device))
        return m.compute_logits(h[:, -1])

    def _layers_rows(self, stage: str, h: torch.Tensor, ctx, t: int, idx: torch.Tensor) -> torch.Tensor:
        """The `stage` ("core" at iteration t, or "coda") layers on batch rows `idx`; the paged cache
        attends for those rows."""
        self.kv.row_index = idx
        cos, sin = ctx.cos.index_select(0, idx), ctx.sin.index_select(0, idx)
        for j, layer in enumerate({"core": self.model.core, "coda": self.model.coda}[stage]):
            kw = {"cache_position": 0, "stage": stage, "index": j, "iteration": t, "rows": len(idx)}
            h = layer(h, cos, sin, None, self.kv, 0, kw)
        return h

    def _read_out(self, state: dict, exits: list[int], ctx) -> torch.Tensor:
        if not self.model.config.coda_read_routers:
            return self.model.recurrence.read_out(state, ctx.loops)
        h = state["h"].clone()  # per-depth final reads: each exit depth reads with its own router
        for k in set(exits):
            idx = torch.tensor([r for r, e in enumerate(exits) if e == k], device=self.device)
            rows = {name: v.index_select(0, idx) for name, v in state.items()}
            h.index_copy_(0, idx, self.model.recurrence.read_out(rows, k))
        return h

    def _fill_skipped(self, seqs: list[Sequence], exits: list[int]) -> None:
        """Copies an early-exited token's K/V of its last iteration into the iterations it skipped."""
        cfg, slot = self.model.config, self.kv.slot
        rows, src, dst = [], [], []
        for r, (seq, e) in enumerate(zip(seqs, exits)):
            for t in range(e, seq.loops if seq.auto else e):
                for j in range(cfg.n_core):
                    rows.append(r)
                    src.append(slot[("core", j, e - 1)])
                    dst.append(slot[("core", j, t)])
        if rows:
            rows_t = torch.tensor(rows, device=self.device)
            src_t = self.kv.write_index[rows_t, torch.tensor(src, device=self.device)]
            dst_t = self.kv.write_index[rows_t, torch.tensor(dst, device=self.device)]
            self.kv.k_flat.index_copy_(0, dst_t, self.kv.k_flat.index_select(0, src_t))
            self.kv.v_flat.index_copy_(0, dst_t, self.kv.v_flat.index_select(0, src_t))

    def verify(self, seqs: list[Sequence]) -> torch.Tensor:
        """Resumes the rounds' draft inputs of `seqs` (deepest first, all with g drafts) from their saved
        states: core iterations draft_loops .. K-1 and the coda at each row's depth K, for positions
        num_computed .. + g - 1, in one forward -> depth-K logits (n, g, V). Their prelude and shallow
        iterations were computed by the drafts and are not run again."""
        g, m = seqs[0].spec_tokens, self.model
        starts = [s.num_computed for s in seqs]
        state = {name: torch.cat([torch.cat([st[name] for st in s.draft_states], dim=1) for s in seqs])
                 for name in seqs[0].draft_states[0]}  # (n, g, ...)
        self.kv.begin_chunk(torch.stack([s.table for s in seqs]).to(self.device), starts, g)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(g, device=self.device)
        depths = [s.loops for s in seqs]
        row_loops = None if depths[0] == depths[-1] else depths
        if row_loops is None and g == self.spec_tokens and self._compiled_ready(len(seqs), depths[0], self.draft_loops, g):
            tables = torch.stack([s.table for s in seqs]).to(self.device)
            return self.compiled.run(state, positions, tables, self.kv.write_index, depths[0], self.draft_loops)[0]
        ctx = m.layer_context(positions, cache=self.kv, loops=depths[0], row_loops=row_loops)
        state = m.iterate(state, self.draft_loops, depths[0], ctx)
        return m.compute_logits(m.finish(state, ctx))

    def chunk(self, seq: Sequence, T: int):
        """T tokens of one sequence from its num_computed on -> (last-position logits (1, V) when this
        chunk reaches the sequence's last known token, else None; the chunk's logits (T, V) when the
        prompt's logprobs are wanted, else None)."""
        start = seq.num_computed
        seq.last_exit = seq.loops  # prompts run every iteration, "auto" ones too
        ids = torch.tensor([seq.token_ids[start : start + T]], device=self.device)
        self.kv.begin_chunk(seq.table[None].to(self.device), [start], T)
        pos = torch.arange(start, start + T, device=self.device)[None]
        want_prompt = seq.wants_prompt_logprobs
        logits, _ = self._forward(ids, pos, seq.loops, None, keep_all=want_prompt)
        done = start + T == seq.num_tokens
        if want_prompt:
            return (logits[-1:] if done else None), logits
        return (logits if done else None), None
