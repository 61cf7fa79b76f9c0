"""Fast screen: train a model on level-1 (or given hops) chains rows and report 1-query val accuracy."""
import argparse, json, math, sys, time
sys.path.insert(0, "/work/main")
import numpy as np, torch, torch.nn.functional as F
from model import MeshConfig, MeshForCausalLM
from training.tasks import chains
from training.train import depth_logits

p = argparse.ArgumentParser()
p.add_argument("--layout", default="1+2R1+1"); p.add_argument("--scheme", default="mesh")
p.add_argument("--max_loops", type=int, default=6); p.add_argument("--d", type=int, default=64)
p.add_argument("--heads", type=int, default=4); p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=2e-3); p.add_argument("--warmup", type=int, default=50)
p.add_argument("--b2", type=float, default=0.95); p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--steps", type=int, default=1000); p.add_argument("--queries", type=int, default=8)
p.add_argument("--order", default="deep")  # deep | random
p.add_argument("--hops", default="1"); p.add_argument("--dis", default="2,4")
p.add_argument("--loops", type=int, default=1); p.add_argument("--all_depths", type=int, default=0)
p.add_argument("--eval_every", type=int, default=100); p.add_argument("--seed", type=int, default=0)
p.add_argument("--time_limit", type=float, default=600); p.add_argument("--scale_emb", type=int, default=0)
p.add_argument("--init", type=float, default=0.02); p.add_argument("--aux", default="none"); p.add_argument("--maxd", type=int, default=9); p.add_argument("--chartok", type=int, default=0); p.add_argument("--aux_w", type=float, default=1.0); p.add_argument("--tag", default="")
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
if a.chartok:
    chains.encode = lambda text: [chains.VOCAB[c] for c in text]
import training.tasks.chains as C
_orig_integers = None
def make_problem_d(rng, hops, distractors=(2, 4)):
    import numpy as np
    n_dis = int(rng.integers(distractors[0], distractors[1] + 1))
    lengths = [hops] + [int(rng.integers(1, hops + 1)) for _ in range(n_dis)]
    while sum(lengths) > 26:
        i = 1 + int(np.argmax(lengths[1:])); lengths[i] -= 1
    names = iter(rng.permutation(list(C.LETTERS)).tolist())
    assignments, values, hop_of = [], {}, {}
    target = None
    for n in lengths:
        prev = None
        for depth in range(1, n + 1):
            var = next(names)
            if prev is None:
                digit = int(rng.integers(0, 10)); assignments.append(f"{var}={digit}"); values[var] = digit
            else:
                digit = int(rng.integers(0, a.maxd + 1))
                sign = "+" if rng.random() < 0.5 else "-"
                assignments.append(f"{var}={prev}{sign}{digit}")
                values[var] = (values[prev] + (digit if sign == "+" else -digit)) % 10
            hop_of[var], prev = depth, var
        target = target or prev
    order = rng.permutation(len(assignments))
    return C.Problem([assignments[i] for i in order], values, hop_of, target)
if a.maxd < 9:
    chains.make_problem = make_problem_d
hops_list = [int(h) for h in a.hops.split(",")]
dis = tuple(int(v) for v in a.dis.split(","))
kw = dict(vocab_size=128, hidden_size=a.d, num_attention_heads=a.heads, rotary_pct=1.0, max_position_embeddings=512,
          bos_token_id=0, eos_token_id=0, pad_token_id=1, scale_embeddings=bool(a.scale_emb), initializer_range=a.init)
if a.layout.isdigit():
    cfg = MeshConfig.from_layout(a.layout, **kw)
else:
    cfg = MeshConfig.from_layout(a.layout, scheme=a.scheme, max_loops=a.max_loops, **kw)
model = MeshForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, a.b2), weight_decay=a.wd)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))

def row(rng):
    h = hops_list[int(rng.integers(len(hops_list)))]
    prob = chains.make_problem(rng, h, dis)
    others = [v for v in prob.values if v != prob.target]
    picked = [prob.target] + [others[i] for i in rng.permutation(len(others))[: a.queries - 1]]
    if a.order == "deep":
        tie = {v: float(rng.random()) for v in picked}
        picked = sorted(picked, key=lambda v: (-prob.hops[v], tie[v]))
    ids, ans, auxl = [], [], []
    for j, asg in enumerate(prob.assignments):
        toks = chains.encode(("" if j == 0 else ";") + asg)
        defv = chains.encode(asg[:2])[0]
        keyn = 1 if a.chartok else 0  # tokens of the key before the payload
        for t_i, t in enumerate(toks):
            ids.append(t)
            # label at this position (predicts 'next'); aux: def var of the current assignment
            auxl.append(defv if (t_i > (0 if j == 0 else 1)) else None)
        if a.aux == "defsrc" and not asg[2:].isdigit():
            auxl[len(ids) - len(toks) + (1 if j == 0 else 2) + 1] = chains.encode(asg[2] + "=")[0]  # the op names the source key
        if j > 0: auxl[len(ids) - len(toks)] = prev_def if a.aux in ("def", "defsrc") else None  # the ';' ends the previous assignment
        prev_def = defv
    nctx = len(ids)
    for v in picked:
        ids += chains.encode(f";?{v}="); ans.append(len(ids) - 1); ids += chains.encode(str(prob.values[v]))
    lab = [-100] * (len(ids) - 1)
    aux = [-100] * (len(ids) - 1)
    if a.aux in ("def", "defsrc"):
        for i in range(nctx): aux[i] = auxl[i] if auxl[i] is not None else -100
        aux[nctx] = prev_def  # the ';' before the first query ends the last assignment
    for i in ans: lab[i] = ids[i + 1]
    return ids[:-1], lab, ans[0], aux

def batch(step):
    rows = [row(chains.rng_for("train", a.seed, step * 4096 + i)) for i in range(a.batch)]
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), 1); y = torch.full((len(rows), T), -100); ya = torch.full((len(rows), T), -100)
    first = []
    for i, (ids, lab, f, aux) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids); y[i, :len(lab)] = torch.tensor(lab); ya[i, :len(aux)] = torch.tensor(aux); first.append(f)
    return x, y, torch.tensor(first), ya

val = {h: chains.eval_problems("val", 0, h, 200) for h in sorted(set(hops_list) | {1})}
# same distractor setting for val
val = {h: [chains.make_problem(chains.rng_for("val", 99, h * 1000 + i), h, dis) for i in range(200)] for h in sorted(set(hops_list))}
@torch.no_grad()
def evaluate():
    model.eval(); res = {}
    ks = list(range(1, a.loops + 1)) if cfg.is_recursive else [1]
    for h, probs in val.items():
        ids = [chains.encode(pr.prompt()) for pr in probs]
        x = torch.full((len(ids), max(map(len, ids))), 1)
        for r, s in enumerate(ids): x[r, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in ids])
        gold = torch.tensor([chains.VOCAB[str(pr.values[pr.target])] for pr in probs])
        if cfg.is_recursive:
            out = depth_logits(model, x, ks)
        else:
            out = {1: model(input_ids=x, use_cache=False).logits}
        res[h] = {k: round((lg[torch.arange(len(ids)), last].argmax(-1) == gold).float().mean().item(), 3) for k, lg in out.items()}
    model.train(); return res

t0 = time.time(); hist = []
for step in range(a.steps):
    x, y, first, ya = batch(step)
    if cfg.is_recursive:
        if a.all_depths:
            lgs = depth_logits(model, x, list(range(1, a.loops + 1)))
        else:
            lgs = depth_logits(model, x, [a.loops])
    else:
        lgs = {1: model(input_ids=x, use_cache=False).logits}
    loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=-100) for lg in lgs.values()) / len(lgs)
    if a.aux != "none":
        loss = loss + a.aux_w * sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ya.reshape(-1), ignore_index=-100) for lg in lgs.values()) / len(lgs)
    lg = lgs[max(lgs)]
    fa = (lg[torch.arange(len(first)), first].argmax(-1) == y[torch.arange(len(first)), first]).float().mean().item()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    hist.append((loss.item(), fa))
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps or time.time() - t0 > a.time_limit:
        l = np.mean([h[0] for h in hist[-a.eval_every:]]); f = np.mean([h[1] for h in hist[-a.eval_every:]])
        print(json.dumps({"tag": a.tag, "step": step + 1, "t": round(time.time() - t0), "loss": round(float(l), 3), "train_first": round(float(f), 3), "val": evaluate()}), flush=True)
        if time.time() - t0 > a.time_limit: break
