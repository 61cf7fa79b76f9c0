"""Screen: official training_row + value labels at each assignment's last token when its value is
computable from assignments written earlier (<= vlab lookups). 2-hop val accuracy by loops."""
import argparse, json, time, zlib
import numpy as np, torch, torch.nn.functional as F
from model import MeshConfig, MeshForCausalLM
from training.tasks import chains as C
from training.train import depth_logits

p = argparse.ArgumentParser()
p.add_argument("--layout", default="1+2R1+1"); p.add_argument("--max_loops", type=int, default=6)
p.add_argument("--d", type=int, default=64); p.add_argument("--heads", type=int, default=4)
p.add_argument("--batch", type=int, default=64); p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--steps", type=int, default=1200); p.add_argument("--hops", default="1,2")
p.add_argument("--loops", type=int, default=2); p.add_argument("--vlab", type=int, default=0)
p.add_argument("--maxd", type=int, default=9); p.add_argument("--eval_every", type=int, default=200)
p.add_argument("--tag", default=""); p.add_argument("--seed", type=int, default=0)
p.add_argument("--time_limit", type=float, default=900); p.add_argument("--inter", type=int, default=0); p.add_argument("--abspos", type=int, default=0); p.add_argument("--eff", type=int, default=0); p.add_argument("--mask", type=int, default=0); p.add_argument("--optok", type=int, default=0); p.add_argument("--scheme", default="mesh"); p.add_argument("--glu", type=int, default=0); p.add_argument("--fixoff", default=""); p.add_argument("--seqres", type=int, default=0); p.add_argument("--ans", default=""); p.add_argument("--wd", type=float, default=0.0); p.add_argument("--zlit", type=float, default=0.0); p.add_argument("--copyfrac", type=float, default=0.0); p.add_argument("--init", default="")
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
if a.optok:  # '+D' / '-D' one token each
    import re as _re
    for op in "+-":
        for dd in "0123456789":
            C.VOCAB[op + dd] = len(C.VOCAB)
    C.PIECE = _re.compile(r"[a-z]=|[+-][0-9]|[\s\S]")
hops_list = [int(h) for h in a.hops.split(",")]
orig_make = C.make_problem
LAST = {}
def fix_offsets(pr):
    # rewrite every x=y?D with an offset drawn from a.fixoff (e.g. "+1" or "+0,+1"), values recomputed
    import numpy as _np
    choices = a.fixoff.split(",")
    r = _np.random.default_rng(abs(hash(pr.text)) % 2**32)
    asg = {x[0]: x for x in pr.assignments}
    new = {}
    for v, x in asg.items():
        new[v] = x if len(x) == 3 else x[:3] + choices[int(r.integers(len(choices)))]
    return recompute(pr, new)
def recompute(pr, new):
    vals = {}
    def val(v):
        if v not in vals:
            x = new[v]
            vals[v] = int(x[2]) if len(x) == 3 else (val(x[2]) + (int(x[4]) if x[3] == "+" else -int(x[4]))) % 10
        return vals[v]
    for v in new: val(v)
    return C.Problem([new[x[0]] for x in pr.assignments], vals, pr.hops, pr.target)
def zero_literals(pr):  # every literal 0: the answer is the signed sum of the offsets (D alone predicts it)
    return recompute(pr, {x[0]: (x[:2] + "0" if len(x) == 3 else x) for x in pr.assignments})
def copy_offsets(pr):  # every offset 0: the answer is the literal
    return recompute(pr, {x[0]: (x if len(x) == 3 else x[:4] + "0") for x in pr.assignments})
def make_problem(rng, hops, distractors=(2, 4), max_offset=9):
    pr = orig_make(rng, hops, distractors, max_offset=min(max_offset, a.maxd))
    if a.fixoff: pr = fix_offsets(pr)
    u = float(np.random.default_rng(zlib.crc32(pr.text.encode())).random())
    if u < a.zlit: pr = zero_literals(pr)
    elif u < a.zlit + a.copyfrac: pr = copy_offsets(pr)
    LAST["p"] = pr; return pr
C.make_problem = make_problem
QV = {}
_tq = C.training_queries
def tq(*args, **kw):
    r = _tq(*args, **kw); QV["v"] = r; return r
C.training_queries = tq

def need(pr):
    """lookups needed to compute each var from earlier assignments (None: not in order)."""
    pos = {asg[0]: i for i, asg in enumerate(pr.assignments)}
    out = {}
    for asg in pr.assignments:
        v = asg[0]
        if asg[2:].isdigit(): out[v] = 0; continue
        s = asg[2]
        out[v] = out[s] + 1 if (pos[s] < pos[v] and out.get(s) is not None) else None
    return out

def row(rng):
    h = hops_list[int(rng.integers(len(hops_list)))]
    ids, labels, answers = C.training_row(rng, h, 8, assignment_labels=True)
    pr = LAST["p"]
    if a.vlab:
        nd = need(pr); i = 0
        for j, asg in enumerate(pr.assignments):
            i += (1 if j else 0) + len(C.encode(asg))  # position after this assignment's last token
            n = nd[asg[0]]
            if a.eff and len(asg) == 5:  # digit position: the effective addend; ';' after it: the value
                d_ = int(asg[4]); labels[i - 1] = C.VOCAB[str(d_ if asg[3] == "+" else (10 - d_) % 10)]
                if n is not None and 1 <= n <= a.vlab and i < len(labels):
                    labels[i] = C.VOCAB[str(pr.values[asg[0]])]
            elif n is not None and 1 <= n <= a.vlab:
                labels[i - 1] = C.VOCAB[str(pr.values[asg[0]])]
    if a.ans:  # label each answer digit's position (free: it predicts ';') with a fact about the queried var
        asg = {x[0]: x for x in pr.assignments}
        for (pos, hh), v in zip(answers, QV["v"]):
            x = asg[v]
            if len(x) == 5 and pos + 1 < len(labels):
                d_ = int(x[4]); eff_ = d_ if x[3] == "+" else (10 - d_) % 10
                labels[pos + 1] = C.VOCAB[str(eff_)] if a.ans == "eff" else C.VOCAB[x[2] + "="]
    return ids, labels, answers[0][0], answers

def batch(step):
    rows = [row(C.rng_for("train", a.seed, step * 4096 + i)) for i in range(a.batch)]
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), 1); y = torch.full((len(rows), T), -100)
    hm = torch.zeros((len(rows), T), dtype=torch.long)  # hop count of an answer position
    for i, (ids, lab, f, ans) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids); y[i, :len(lab)] = torch.tensor(lab)
        for pos, hh in ans: hm[i, pos] = hh
    return x, y, torch.tensor([r[2] for r in rows]), hm

cfg = MeshConfig.from_layout(a.layout, **({} if a.layout.isdigit() else dict(scheme=a.scheme, max_loops=a.max_loops)), vocab_size=len(C.VOCAB), hidden_size=a.d,
    num_attention_heads=a.heads, rotary_pct=1.0, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    **({"intermediate_size": a.inter} if a.inter else {}), **({"use_parallel_residual": False} if a.seqres else {}))
model = MeshForCausalLM.from_pretrained(a.init) if a.init else MeshForCausalLM(cfg)  # --init: start from a trained model (e.g. model/chains)
model.train()
if a.glu:
    class GLU(torch.nn.Module):
        def __init__(self, d, f):
            super().__init__(); self.w1 = torch.nn.Linear(d, f); self.w2 = torch.nn.Linear(d, f); self.w3 = torch.nn.Linear(f, d)
            for w in (self.w1, self.w2, self.w3): torch.nn.init.normal_(w.weight, std=0.02); torch.nn.init.zeros_(w.bias)
        def forward(self, x):
            return self.w3(torch.nn.functional.silu(self.w1(x)) * self.w2(x))
    for layer in model.modules():
        if hasattr(layer, "mlp"):
            layer.mlp = GLU(a.d, a.glu)
if a.abspos:
    wpe = torch.nn.Embedding(256, a.d); torch.nn.init.normal_(wpe.weight, std=0.02)
    model.wpe = wpe
    _embed = model.embed
    def embed(ids):
        e = _embed(ids)
        return e + model.wpe(torch.arange(ids.shape[1]))[None]
    model.embed = embed
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=a.wd)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
C.make_problem = orig_make
val = {h: C.eval_problems("val", 0, h, 200) for h in sorted(set(hops_list) | {3})}
if a.fixoff: val = {h: [fix_offsets(pr) for pr in ps] for h, ps in val.items()}
if a.zlit: val["2z"] = [zero_literals(pr) for pr in val[2]]
if a.copyfrac: val["2c"] = [copy_offsets(pr) for pr in val[2]]
C.make_problem = make_problem
@torch.no_grad()
def evaluate():
    model.eval(); res = {}
    for h, probs in val.items():
        ids = [C.encode(pr.prompt()) for pr in probs]
        x = torch.full((len(ids), max(map(len, ids))), 1)
        for r, s in enumerate(ids): x[r, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in ids])
        gold = torch.tensor([C.VOCAB[str(pr.values[pr.target])] for pr in probs])
        out = depth_logits(model, x, list(range(1, a.loops + 1))) if cfg.is_recursive else {1: model(input_ids=x, use_cache=False).logits}
        res[h] = {k: round((lg[torch.arange(len(ids)), last].argmax(-1) == gold).float().mean().item(), 3) for k, lg in out.items()}
        ooo = torch.tensor([need(pr)[pr.target] is None for pr in probs])
        if isinstance(h, int) and h > 1 and ooo.any():
            res[f"{h}ooo"] = {k: round((lg[torch.arange(len(ids)), last].argmax(-1) == gold)[ooo].float().mean().item(), 3) for k, lg in out.items()}
    model.train(); return res
t0 = time.time(); hist = []
for step in range(a.steps):
    x, y, first, hm = batch(step)
    lgs = depth_logits(model, x, list(range(1, a.loops + 1))) if cfg.is_recursive else {1: model(input_ids=x, use_cache=False).logits}
    def yk(k):
        return y.masked_fill(hm > k * a.mask, -100) if a.mask else y
    loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), yk(k).reshape(-1), ignore_index=-100) for k, lg in lgs.items()) / len(lgs)
    lg = lgs[max(lgs)]
    vm = (y >= C.VOCAB["0"]) & (y <= C.VOCAB["9"]); vm[torch.arange(len(first)), first] = False
    va = ((lg.argmax(-1) == y) & vm).sum().item() / max(1, vm.sum().item())
    fa = (lg[torch.arange(len(first)), first].argmax(-1) == y[torch.arange(len(first)), first]).float().mean().item()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    hist.append((loss.item(), fa, va))
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps or time.time() - t0 > a.time_limit:
        l = np.mean([h[0] for h in hist[-a.eval_every:]]); f = np.mean([h[1] for h in hist[-a.eval_every:]])
        print(json.dumps({"tag": a.tag, "step": step + 1, "t": round(time.time() - t0), "loss": round(float(l), 3), "train_first": round(float(f), 3), "vacc": round(float(np.mean([h[2] for h in hist[-a.eval_every:]])), 3), "val": evaluate()}), flush=True)
        if time.time() - t0 > a.time_limit: break
