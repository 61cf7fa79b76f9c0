import sys, math, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1); torch.manual_seed(0)
class Block(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.h = h; s.ln1 = nn.LayerNorm(d); s.ln2 = nn.LayerNorm(d)
        s.qkv = nn.Linear(d, 3 * d); s.o = nn.Linear(d, d); s.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.qkv(s.ln1(x)).split(C, -1)
        q, k, v = [t.view(B, T, s.h, C // s.h).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + s.o(y); return x + s.mlp(s.ln2(x))
class GPT(nn.Module):
    def __init__(s, V, d, h, L, T=256):
        super().__init__(); s.e = nn.Embedding(V, d); s.p = nn.Embedding(T, d); s.b = nn.ModuleList(Block(d, h) for _ in range(L)); s.ln = nn.LayerNorm(d); s.head = nn.Linear(d, V)
    def forward(s, x):
        h = s.e(x) + s.p(torch.arange(x.shape[1]))
        for b in s.b: h = b(h)
        return s.head(s.ln(h))
L = int(sys.argv[1]); n = int(sys.argv[2]); lr = float(sys.argv[3]); B = int(sys.argv[4])
m = GPT(64, 64, 4, L); opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0)
for s in range(2000):
    keys = torch.argsort(torch.rand(B, 26), -1)[:, :n] + 20
    vals = torch.randint(5, 15, (B, n))
    q = torch.argsort(torch.rand(B, n), -1)
    qk = torch.gather(keys, 1, q); qv = torch.gather(vals, 1, q)
    ctx = torch.stack([keys, vals], -1).reshape(B, -1); qs = torch.stack([qk, qv], -1).reshape(B, -1)
    x = torch.cat([ctx, qs], 1); y = torch.full_like(x, -100)
    pos = ctx.shape[1] + torch.arange(n) * 2
    y[:, pos] = x[:, pos + 1]
    lg = m(x[:, :-1]); loss = F.cross_entropy(lg.reshape(-1, 64), y[:, :-1].reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 250 == 249:
        acc = (lg[:, pos[0]].argmax(-1) == y[:, pos[0]]).float().mean().item()
        print("ref", L, n, lr, B, s + 1, round(loss.item(), 3), "first-acc", round(acc, 3), flush=True)
