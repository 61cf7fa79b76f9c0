import sys, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from model import MeshConfig, MeshForCausalLM
torch.set_num_threads(1); torch.manual_seed(0)
off = int(sys.argv[1]); rp = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
cfg = MeshConfig.from_layout("2", vocab_size=64, hidden_size=64, num_attention_heads=4, rotary_pct=rp, max_position_embeddings=128)
m = MeshForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
for s in range(400):
    x = torch.randint(3, 40, (64, 40))
    y = torch.full_like(x, -100); y[:, off:] = x[:, :-off]
    lg = m(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(lg.reshape(-1, 64), y.reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 100 == 99:
        acc = (lg.argmax(-1) == y)[:, off:].float().mean().item()
        print(off, s + 1, round(loss.item(), 3), round(acc, 3), flush=True)
