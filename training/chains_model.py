"""Builds the chains model (model/chains) end to end: train -> evaluate -> export -> card.

    python -m training.chains_model --out model/chains      (= make train-chains)

Checkpoints and metrics go to ``--work`` (default runs/chains); rerunning the command resumes
training from there. The export holds what serving needs (config.json, generation_config.json,
model.safetensors, the character tokenizer) plus MODEL_CARD.md and eval.json with the accuracy by
hop count x loops on held-out (test split) problems. ``default_loops`` is set to max_loops: the
depth that follows the most hops.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_trainer_state, read_summary
from .common import UsageError, fsync_tree, replace_dir_atomic, run_cli
from .config import load_config
from .default_model import config_block, export
from .evaluate import load_model
from .evaluate_chains import accuracy_table, format_table, model_answers, problem_set, table_json
from .train import train

CHAINS_CONFIG = Path(__file__).parent / "configs" / "chains.toml"
MAX_BYTES = 10 * 1000 * 1000
EVAL_PROBLEMS = 200  # per hop count


def model_card(*, command: str, config: dict, summary: dict, tables: tuple, eval_command: str, n_params: int, size: int) -> str:
    """tables: (accuracy on the task's problems, accuracy on the problems it trained on or None, their max D)."""
    table, trained, top = tables
    tc = summary["config"]["train"]
    data = summary["config"]["data"]
    loops = list(next(iter(table.values())))
    wall = summary.get("wall_time_s", summary["train_time_s"])
    return f"""# MeSH chains model: multi-hop variable chains, more loops for more hops

A tiny MeSH recursive transformer (arXiv 2510.07739) for variable-chain problems
(training/tasks/chains.py), e.g. {"`c=a+0;a=3;b=c-0;?b=` -> `3`" if top == 0 else "`c=a+4;a=3;b=c-1;?b=` -> `6`"}. A k-hop answer needs k sequential
lookups, and each loop adds {config['n_core']} core layer applications, so deeper requests can follow longer chains.
{"It is trained on copy chains (every D = 0) only and answers the task's problems with D > 0 at chance from 2 hops on" if top == 0 else ""}{"." if top == 0 else ""}
Serve it with `python -m server --model model/chains` and ask with `"loops": 1..{config['max_loops']}`, `"max_tokens": 1`.

- Architecture: GPT-NeoX blocks, {config['n_prelude']} prelude + {config['n_core']} core (looped 1..{config['max_loops']} times) + {config['n_coda']} coda,
  MeSH memory with {config['mesh_slots']} slots, d={config['hidden_size']}, {config['num_attention_heads']} heads, rotary_pct {config['rotary_pct']:g},
  coda read routers per depth: {config.get('coda_read_routers', False)}, embeddings scaled by sqrt(d): {config.get('scale_embeddings', False)}.
- Parameters: {n_params:,} (float32, {size / 1e6:.2f} MB on disk). Tokenizer: one token per character (no BOS).
- Training: {summary['step']:,} steps of {tc['batch_size']} generated lines ({data.get('queries')} queries each; the loss is on answer digits
  {"and on the auxiliary assignment labels (each assignment token names the key it defines, its operator the key it reads)" if data.get('assignment_labels') else "only"}),
  a loss at every depth 1..K each step (train.depth_losses = {tc['depth_losses']!r}), K capped at {data.get('loops_per_hop')} x the curriculum's hop count
  {f"except every {data.get('uncapped_every')}th step (all {config['max_loops']} loops)" if data.get('uncapped_every') else ""};
  the curriculum adds a hop count once first-answer accuracy at the deepest depth reaches {data.get('advance_at')}{
  f" (from 2 hops on, in stages of chain offsets D <= {data.get('offset_stages')})" if data.get('offset_stages', [9]) != [9] and top == 9 else ""};
  it ended at {summary.get('curriculum', '?')}.
  AdamW ({tc['beta1']}, {tc['beta2']}), wd {tc['weight_decay']}, lr {tc['lr']} (constant after {tc['warmup_steps']} warmup steps), seed {tc['seed']}.
- Training time: {summary['train_time_s'] / 60:.1f} min of optimizer steps ({wall / 60:.1f} min wall clock with evals and checkpoints)
  on a 2-core CPU shared with other jobs, 1 torch thread.

## Accuracy by hop count x loops
{trained_section(trained, top, eval_command)}
`{eval_command}` ({EVAL_PROBLEMS} held-out test problems per hop count with any D, the task's problems; chance is about 10%):

{format_table(table)}

## Reproduce

```bash
{command}
```

with training/configs/chains.toml:

```toml
[data]
{chr(10).join(f"{k} = {json.dumps(v)}" for k, v in data.items())}

{config_block(summary['config'])}
```

Rerunning it resumes from its work directory. Loops = {max(loops)} is the default depth.
"""


def trained_section(trained: dict | None, top: int, eval_command: str) -> str:
    if trained is None:
        return ""
    return f"""
Trained on {problem_set(top)} only (data.max_offset = {top}): `{eval_command} --max-offset {top}` ({EVAL_PROBLEMS} held-out
test problems per hop count):

{format_table(trained)}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.chains_model", description="Train, evaluate and export the chains model (make train-chains).")
    p.add_argument("--out", required=True, metavar="DIR", help="where the exported model goes (model/chains)")
    p.add_argument("--config", default=str(CHAINS_CONFIG), metavar="TOML", help="training config (default: configs/chains.toml)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--work", default="runs/chains", metavar="DIR", help="checkpoints and metrics (default runs/chains); reruns resume from it")
    p.add_argument("--eval-only", action="store_true", help="export the latest checkpoint of --work without training further")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        cfg = load_config(args.config, args.set)
        work, out = Path(args.work), Path(args.out)
        if not args.eval_only:
            train(cfg, work, progress=not args.quiet)
        ckpt = latest_checkpoint(work)
        if ckpt is None:
            raise UsageError(f"no checkpoint in {work}")
        summary = read_summary(ckpt)
        data_state = load_trainer_state(ckpt).get("data", {})
        summary["curriculum"] = f"level {data_state.get('level', '?')} hops, max offset {data_state.get('max_offset', 9)}"
        model, _ = load_model(ckpt, torch.device("cpu"))
        c = model.config
        hops, loops = list(range(1, int(summary["config"]["data"].get("max_hops", 8)) + 1)), list(range(1, c.max_loops + 1))
        answer = functools.partial(model_answers, model)
        table = accuracy_table(answer, hops, loops, EVAL_PROBLEMS)
        top = int(summary["config"]["data"].get("max_offset", 9))
        trained = accuracy_table(answer, hops, loops, EVAL_PROBLEMS, max_offset=top) if top < 9 else None

        tmp = export(ckpt, out, c.max_loops)
        gen = {"do_sample": False, "max_new_tokens": 1, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        size = sum(f.stat().st_size for f in tmp.iterdir())
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--eval-only"]  # the command that trains it
        command = "make train-chains  # = " + shlex.join(["python", "-m", "training.chains_model", *given])
        eval_command = f"python -m training.evaluate_chains --model {out} --loops 1-{c.max_loops} --hops 1-{max(hops)} --n {EVAL_PROBLEMS}"
        card = model_card(command=command, config=config, summary=summary, tables=(table, trained, top), eval_command=eval_command,
                          n_params=model.num_parameters(), size=size)
        (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        result = {"split": "test", "n": EVAL_PROBLEMS, "accuracy": table_json(table)}
        if trained is not None:
            result.update(max_offset=top, accuracy_trained_problems=table_json(trained))
        (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        replace_dir_atomic(tmp, out)
        print(format_table(table))
        if trained is not None:
            print(f"{problem_set(top)}, what it was trained on:")
            print(format_table(trained))
        print(f"exported {out} ({size / 1e6:.2f} MB, default_loops {c.max_loops})")
        if size > MAX_BYTES:
            print(f"warning: {out} is {size / 1e6:.1f} MB, over the 10 MB budget", file=sys.stderr)

    return run_cli("chains_model", body)


if __name__ == "__main__":
    raise SystemExit(main())
