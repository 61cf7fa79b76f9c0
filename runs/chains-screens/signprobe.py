import sys, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from training.evaluate import load_model
from training.evaluate_chains import model_answers
from training.tasks import chains
m, _ = load_model(sys.argv[1], torch.device("cpu"))
probs = [chains.make_problem(chains.rng_for("val", 7, i), 2, max_offset=int(sys.argv[2])) for i in range(400)]
ans = model_answers(m, [p.prompt() for p in probs], [2, 6])
from collections import defaultdict
for k in (2, 6):
    st = defaultdict(lambda: [0, 0])
    for a, p in zip(ans[k], probs):
        asg = [x for x in p.assignments if x.startswith(p.target + "=")][0]
        key = asg[3:]
        v_src = p.values[asg[2]]
        st[key][0] += a == str(p.values[p.target]); st[key][1] += 1
        st["copy-answer " + key][0] += a == str(v_src); st["copy-answer " + key][1] += 1
    print(k, {s: f"{c}/{n}" for s, (c, n) in sorted(st.items())})
