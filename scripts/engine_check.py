"""Check the serving engine on a device (CPU or CUDA) without HTTP: greedy tokens against
MeshForCausalLM.generate in a busy mixed-depth batch, seeded sampling alone and in a busy batch,
then decode tokens/s against generate().

    python scripts/engine_check.py                                  # random 2+4R2+2 model, auto device
    python scripts/engine_check.py --model model/default --device cuda --dtype bfloat16
    python scripts/engine_check.py --layout 12 --hidden-size 768 --heads 12 --batch 1 32 --new-tokens 256

Greedy comparisons count only steps before generate()'s first near-tie: a top-2 logit margin of at
most 1e-4 in float32, 0.05 in bfloat16/float16 (float sums differ in the last bits between batch shapes). Speed: each batch
size is timed after one warm-up, the engine (`Engine.generate`, the scheduler and model runner) and
generate() on the same weights, the same prompts (32 random tokens) and the same thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from model import MeshConfig, MeshForCausalLM
from model.device import resolve_device
from server import Engine, EngineConfig, SamplingParams
from server.engine import load, resolve_dtype


class ByteTokenizer:
    """Enough of a tokenizer for a random model fed token ids: decodes ids as bytes (the engine needs no more)."""

    eos_token_id = 0

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({chr(i): i for i in range(256)}, unk_token="\x00"))
        self.backend_tokenizer.decoder = decoders.Fuse()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random model from the flags below)")
    p.add_argument("--layout", default="2+4R2+2")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-loops", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--loops", type=int, default=None, help="depth for the speed runs (default: the model's)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        model, tok = load(args.model, device, dtype)
    else:
        kw = dict(hidden_size=args.hidden_size, num_attention_heads=args.heads, vocab_size=args.vocab_size,
                  max_position_embeddings=1024, initializer_range=0.2, eos_token_id=0)
        cfg = (MeshConfig.from_layout(args.layout, **kw) if args.layout.strip().isdigit()
               else MeshConfig.from_layout(args.layout, scheme="mesh", max_loops=args.max_loops, **kw))
        torch.manual_seed(0)
        model, tok = MeshForCausalLM(cfg).to(device=device, dtype=dtype).eval(), ByteTokenizer()
    cfg = model.config
    engine = Engine(EngineConfig(max_batch_size=max(64, max(args.batch)), max_num_batched_tokens=max(256, max(args.batch))), model=model, tokenizer=tok,
                    metrics=False)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "dtype": str(dtype), "layout": cfg.layout, "scheme": cfg.scheme, "hidden_size": cfg.hidden_size,
              "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    print(json.dumps(result))

    # 1. Greedy in a mixed-depth batch == generate() at each row's depth.
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, cfg.vocab_size, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (8,), generator=gen)]
    depths = [1 + i % cfg.max_loops for i in range(len(prompts))]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, detokenize=False)
    seqs = [engine.add_request([ids], greedy, loops=k)[0] for ids, k in zip(prompts, depths)]
    while engine.has_work():
        engine.step()
    compared = agreed = 0
    # A near-tie is a gap below float noise: 1e-4 in float32; in 16-bit floats a few units of the last place.
    tie = 1e-4 if dtype == torch.float32 else 0.05
    with torch.inference_mode():
        for ids, k, seq in zip(prompts, depths, seqs):
            out = model.generate(torch.tensor([ids], device=device), loops=k, max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            ref = out.sequences[0, len(ids):].tolist()
            for i, logits in enumerate(out.logits):
                top2 = logits[0].float().topk(2).values
                if float(top2[0] - top2[1]) <= tie:
                    break
                compared += 1
                agreed += seq.output_ids[i] == ref[i]
    result["greedy_agreement"] = f"{agreed}/{compared}"
    print(f"greedy tokens equal to generate() in a mixed-depth batch: {agreed}/{compared}")

    # 2. Seeded sampling: the same tokens alone and inside a busy batch of other depths.
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=123, max_tokens=24, ignore_eos=True, detokenize=False)
    alone = engine.generate([prompts[0]], seeded, loops=cfg.max_loops)[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, detokenize=False)
    for ids, k in zip(prompts[1:], depths[1:]):
        engine.add_request([ids], noise, loops=k)
    engine.step()
    (seq,) = engine.add_request([prompts[0]], seeded, loops=cfg.max_loops)
    while engine.has_work():
        engine.step()
    result["seeded_sampling_batch_invariant"] = seq.output_ids == alone
    print(f"seeded sampling: same tokens alone and in a busy batch: {seq.output_ids == alone}")

    # 3. Decode speed: the engine against generate() on the same weights.
    loops = args.loops or cfg.default_loops
    speed = []
    for B in args.batch:
        ids = torch.randint(2, cfg.vocab_size, (B, 32), generator=gen)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)

        def ours():
            engine.generate(ids.tolist(), params, loops=loops)

        def hf():
            with torch.inference_mode():
                model.generate(ids.to(device), loops=loops, max_new_tokens=args.new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)

        row = {"batch": B}
        for name, fn in (("engine", ours), ("generate", hf)):
            fn()  # warm-up
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            row[name + "_tokens_per_s"] = round(B * args.new_tokens / (time.perf_counter() - t), 1)
        row["ratio"] = round(row["engine_tokens_per_s"] / row["generate_tokens_per_s"], 2)
        speed.append(row)
        print(json.dumps(row))
    result["speed"] = speed
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if agreed == compared and result["seeded_sampling_batch_invariant"] else 1


if __name__ == "__main__":
    sys.exit(main())
