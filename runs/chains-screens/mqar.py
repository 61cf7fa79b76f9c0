import sys, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from model import MeshConfig, MeshForCausalLM
torch.set_num_threads(1); torch.manual_seed(0)
L = sys.argv[1]; n = int(sys.argv[2]); lr = float(sys.argv[3]); B = int(sys.argv[4]); sep = int(sys.argv[5])
import json, os
kw = dict(vocab_size=64, hidden_size=64, num_attention_heads=4, rotary_pct=1.0, max_position_embeddings=256); kw.update(json.loads(os.environ.get("KW", "{}")))
cfg = MeshConfig.from_layout(L, **kw)
m = MeshForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0)
for s in range(int(os.environ.get("STEPS", 1000))):
    keys = torch.argsort(torch.rand(B, 26), -1)[:, :n] + 20
    vals = torch.randint(5, 15, (B, n))
    q = torch.argsort(torch.rand(B, n), -1)
    qk = torch.gather(keys, 1, q); qv = torch.gather(vals, 1, q)
    if sep:
        ctx = torch.stack([keys, vals, torch.full_like(keys, 3)], -1).reshape(B, -1)
        qs = torch.stack([torch.full_like(qk, 4), qk, qv], -1).reshape(B, -1)
    else:
        ctx = torch.stack([keys, vals], -1).reshape(B, -1); qs = torch.stack([qk, qv], -1).reshape(B, -1)
    x = torch.cat([ctx, qs], 1)
    y = torch.full_like(x, -100)
    w = 3 if sep else 2
    pos = ctx.shape[1] + torch.arange(n) * w + (w - 2)  # position of query key
    y[:, pos] = x[:, pos + 1]
    if os.environ.get('ECHO'):
        vp = torch.arange(n) * w + 1
        y[:, vp] = x[:, vp - 1]
    # only first query counts for elimination-free metric
    lg = m(input_ids=x[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(lg.reshape(-1, 64), y[:, :-1].reshape(-1) if False else y[:, :-1].reshape(-1), ignore_index=-100) if False else F.cross_entropy(lg.reshape(-1, 64), y[:, :-1].reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 250 == 249:
        acc = (lg[:, pos[0]].argmax(-1) == y[:, pos[0]]).float().mean().item()
        print(L, n, lr, B, sep, s + 1, round(loss.item(), 3), "first-acc", round(acc, 3), flush=True)
