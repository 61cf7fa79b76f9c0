"""Accuracy of a model on held-out chains problems, by hop count x loops, in process or over HTTP.

    python -m training.evaluate_chains --model model/chains --loops 1-6 --hops 1-8
    python -m training.evaluate_chains --url http://127.0.0.1:8000 --loops 1-6 --hops 1,3,5 --json

Each problem is one prompt ``assignments;?x=`` (training/tasks/chains.py, the test split by default;
training uses val, so these problems were never seen). The answer is the first character of the
greedy continuation: in process the argmax of the next-token logits; over HTTP the first character
of a ``/v1/completions`` text with temperature 0 and the extension field ``loops``. Both read the
same argmax, so they agree up to near-ties (float differences between batched and single rows).
"""

from __future__ import annotations

import argparse
import functools
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from .common import UsageError, parse_int_list, pick_device, run_cli
from .tasks import chains

# The first character of each token as text (special tokens print nothing), as a completion starts.
ID_TO_CHAR = {i: t[:1] for t, i in chains.VOCAB.items() if t not in chains.SPECIAL}


@torch.no_grad()
def model_answers(model, prompts: list[str], loops_list, batch: int = 64) -> dict[int, list[str]]:
    """{loops: the greedy next character after each prompt}; one pass per batch gives every depth."""
    from .train import depth_logits

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {k: [] for k in loops_list}
    for i in range(0, len(prompts), batch):
        ids = [chains.encode(p) for p in prompts[i : i + batch]]
        x = torch.full((len(ids), max(map(len, ids))), chains.PAD_ID)  # right padding: causal attention never sees it
        for r, row in enumerate(ids):
            x[r, : len(row)] = torch.tensor(row)
        last = torch.tensor([len(row) - 1 for row in ids], device=device)
        for k, logits in depth_logits(model, x.to(device), list(loops_list)).items():
            out[k] += [ID_TO_CHAR.get(t, "") for t in logits[torch.arange(len(ids), device=device), last].argmax(-1).tolist()]
    model.train(was_training)
    return out


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise UsageError(f"{url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def served_model(base: str, timeout: float = 60.0) -> str:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=timeout) as r:
            return json.loads(r.read())["data"][0]["id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
        raise UsageError(f"cannot list models at {base}/v1/models: {getattr(e, 'reason', e)}") from None


def http_answers(base: str, prompts: list[str], loops_list, workers: int = 8, timeout: float = 60.0) -> dict[int, list[str]]:
    """The same answers from a running server: the first character of a one-token greedy completion."""
    base = base.rstrip("/")
    name = served_model(base, timeout)

    def answer(prompt: str, loops: int) -> str:
        body = {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0, "loops": loops}
        return _post(f"{base}/v1/completions", body, timeout)["choices"][0]["text"][:1]

    with ThreadPoolExecutor(workers) as pool:
        return {k: list(pool.map(lambda p: answer(p, k), prompts)) for k in loops_list}


def accuracy_table(answer_fn, hops_list, loops_list, n: int, split: str = "test", seed: int = 0, max_offset: int = 9) -> dict:
    """{hops: {loops: accuracy}} over n problems per hop count (``max_offset`` 0: copy chains);
    ``answer_fn(prompts, loops_list)`` is `model_answers` or `http_answers` with its first argument bound."""
    table = {}
    for hops in hops_list:
        problems = chains.eval_problems(split, seed, hops, n, max_offset)
        got = answer_fn([p.prompt() for p in problems], loops_list)
        table[hops] = {k: sum(a == str(p.values[p.target]) for a, p in zip(got[k], problems)) / n for k in loops_list}
    return table


def table_json(table: dict) -> dict:
    """{hops: {loops: accuracy}} with string keys, as JSON holds it."""
    return {str(h): {str(k): a for k, a in row.items()} for h, row in table.items()}


def problem_set(max_offset: int) -> str:
    """How a table's problems are named: the task's, copy chains, or a cap on D."""
    return "copy-chain problems (D = 0)" if max_offset == 0 else f"problems (D <= {max_offset})" if max_offset < 9 else "problems"


def format_table(table: dict) -> str:
    loops = list(next(iter(table.values())))
    lines = ["| hops | " + " | ".join(f"loops={k}" for k in loops) + " |", "|---:|" + "---:|" * len(loops)]
    for hops, row in table.items():
        lines.append(f"| {hops} | " + " | ".join(f"{100 * row[k]:.1f}%" for k in loops) + " |")
    return "\n".join(lines)


def plot_heatmap(table: dict, path, title: str) -> None:
    """Accuracy by hop count (rows) x loops (columns) as a PNG heatmap with the numbers written in."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    hops, loops = list(table), list(next(iter(table.values())))
    grid = [[100 * table[h][k] for k in loops] for h in hops]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(loops), 0.9 + 0.5 * len(hops)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(loops)), [str(k) for k in loops])
    ax.set_yticks(range(len(hops)), [str(h) for h in hops])
    ax.set_xlabel("loops")
    ax.set_ylabel("hops")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate_chains", description="Chains accuracy by hop count x loops, in process or through a server.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="DIR", help="model directory or training run directory (in-process evaluation)")
    where.add_argument("--url", metavar="URL", help="a running server, e.g. http://127.0.0.1:8000 (sends /v1/completions)")
    p.add_argument("--loops", default="1-6", help="depths: a range or a comma list, e.g. 1-6 or 1,3,6 (default 1-6)")
    p.add_argument("--hops", default="1-8", help="hop counts: a range or a comma list (default 1-8)")
    p.add_argument("--n", type=int, default=200, help="problems per hop count (default 200)")
    p.add_argument("--split", default="test", choices=sorted(chains.SPLIT_SEEDS), help="problem set (default test; training evaluates on val)")
    p.add_argument("--seed", type=int, default=0, help="problem seed within the split (default 0)")
    p.add_argument("--max-offset", type=int, default=9, choices=range(10), metavar="D",
                   help="largest D of x=y+D / x=y-D in the problems (default 9: the task; 0: copy chains)")
    p.add_argument("--device", default="auto", help="in process: auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=8, help="over HTTP: concurrent requests (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="also write the table as a heatmap")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        if args.n < 1 or args.workers < 1:
            raise UsageError("--n and --workers must be >= 1")
        hops = parse_int_list(args.hops, "--hops", 1, chains.MAX_HOPS)
        if args.url:
            loops = parse_int_list(args.loops, "--loops", 1)
            answer_fn = functools.partial(http_answers, args.url, workers=args.workers)
            source = args.url
        else:
            from .evaluate import load_model

            model, directory = load_model(args.model, pick_device(args.device))
            loops = parse_int_list(args.loops, "--loops", 1, model.config.max_loops)
            answer_fn = functools.partial(model_answers, model)
            source = str(directory)
        table = accuracy_table(answer_fn, hops, loops, args.n, args.split, args.seed, args.max_offset)
        what = problem_set(args.max_offset)
        if args.plot:
            plot_heatmap(table, args.plot, f"{source}: accuracy on {args.n} {args.split} {what} per hop count")
        if args.json:
            out = {"source": source, "split": args.split, "seed": args.seed, "n": args.n, "max_offset": args.max_offset, "accuracy": table_json(table)}
            print(json.dumps(out, indent=2))
        else:
            print(f"{source}: {args.n} {args.split} {what} per hop count, accuracy of the first answer character")
            print(format_table(table))

    return run_cli("evaluate_chains", body)


if __name__ == "__main__":
    raise SystemExit(main())
