import sys, torch, json
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from training.evaluate import load_model
from training.evaluate_chains import model_answers
from training.tasks import chains
m, _ = load_model(sys.argv[1], torch.device("cpu"))
mo = int(sys.argv[2]); n = int(sys.argv[3])
out = {}
for h in range(1, 9):
    probs = [chains.make_problem(chains.rng_for("test", 1000 + h, i), h, max_offset=mo) for i in range(n)]
    ans = model_answers(m, [p.prompt() for p in probs], list(range(1, 7)))
    out[h] = {k: sum(a == str(p.values[p.target]) for a, p in zip(ans[k], probs)) / n for k in range(1, 7)}
    print(h, " ".join(f"{100*v:.1f}" for v in out[h].values()), flush=True)
