"""Extractor cost, as ratios against baselines run in the same process.

Model (--arch): random-init BERT with bert-base-uncased's config (exactly the real model's cost); ``llama``: a
Llama-shaped model of the same width and depth (rotary, grouped-query attention 12 query / 4 key-value heads,
RMSNorm, SwiGLU, vocabulary 32000); ``modernbert``: ModernBERT-base's config (22 layers, rotary, local
128-token windows with a global layer every third).
Inputs: the paper's RRT shape - 402-token sequences, one query each.

    (a) extractor / plain forward (SDPA, no attention output)   target <= 1.15
    (b) paper's method / extractor: one sequence at a time, eager attention,
        output_attentions=True, rows read from the full maps      target >= 2 (CPU), >= 20 (GPU)
    (c) peak memory of the extractor over 200 sequences           target <= 2 GB
        (CPU: peak RSS of a fresh subprocess, model included; GPU: torch peak allocated)

Usage: python benchmarks/bench_extractor.py [--arch bert|llama|modernbert] [--device cpu|cuda] [--n 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SEQ_LEN = 402


def bert_base(device, dtype=torch.float32, arch: str = "bert"):
    import transformers as T

    from attnlab.core.models import wrap_model

    torch.manual_seed(0)
    if arch == "llama":
        model = T.LlamaModel(T.LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                                           max_position_embeddings=2048))
    elif arch == "modernbert":
        model = T.ModernBertModel(T.ModernBertConfig())  # ModernBertConfig() defaults are ModernBERT-base's
    else:
        model = T.BertModel(T.BertConfig())  # BertConfig() defaults are bert-base-uncased's
    return wrap_model(model.to(device=device, dtype=dtype), name=f"random-init {arch}-base shape")


def rrt_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = (SEQ_LEN - 2) // 2
    x = torch.randint(1000, 20000, (n, half), generator=g)
    ids = torch.cat([torch.full((n, 1), 101), x, x, torch.full((n, 1), 102)], dim=1)
    qpos = half + 1 + torch.randint(1, half - 1, (n, 1), generator=g)
    ids[torch.arange(n), qpos[:, 0]] = 103
    return ids, torch.ones_like(ids), qpos


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory_child(device_name: str, n: int, batch_size: int | None, arch: str) -> None:
    """Run in a fresh process so that ru_maxrss reflects the extractor alone."""
    from attnlab import extract_attention

    device = torch.device(device_name)
    lm = bert_base(device, arch=arch)
    ids, mask, qpos = rrt_batch(n, seed=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extract_attention(lm, ids, mask, qpos, batch_size=batch_size)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_bytes": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="bert", choices=["bert", "llama", "modernbert"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="sequences timed in (a) and (b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the extractor and plain forward; the paper's method always runs float32")
    ap.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        return peak_memory_child(args.device, args.memory_n, args.batch_size, args.arch)

    from attnlab import extract_attention

    device = torch.device(args.device)
    n = args.n or (64 if device.type == "cuda" else 8)
    torch.set_grad_enabled(False)
    lm = bert_base(device, arch=args.arch)
    eager = copy.deepcopy(lm.model)  # the paper's method: float32, eager attention
    eager.set_attn_implementation("eager")
    if args.dtype == "bfloat16":
        lm.model.to(torch.bfloat16)
    ids, mask, qpos = rrt_batch(n)
    batch_size = args.batch_size or n

    def plain():
        for s in range(0, n, batch_size):
            lm.base(input_ids=ids[s:s + batch_size].to(device), attention_mask=mask[s:s + batch_size].to(device))

    def extractor():
        extract_attention(lm, ids, mask, qpos, batch_size=batch_size)


    def paper_method():
        for i in range(n):
            out = eager(input_ids=ids[i:i + 1].to(device), output_attentions=True)
            torch.stack([a[0, :, qpos[i, 0]] for a in out.attentions]).cpu()

    t_plain = timed(plain, device, args.repeats)
    t_extract = timed(extractor, device, args.repeats)
    t_paper = timed(paper_method, device, max(1, args.repeats - 1))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arch": args.arch, "dtype": args.dtype, "sequences": n, "seq_len": SEQ_LEN, "batch_size": batch_size,
        "plain_forward_s": round(t_plain, 4), "extractor_s": round(t_extract, 4), "paper_method_s": round(t_paper, 4),
        "a_extractor_over_plain": round(t_extract / t_plain, 3),
        "b_paper_over_extractor": round(t_paper / t_extract, 2),
    }
    if not args.skip_memory:
        cmd = [sys.executable, __file__, "--_memory-child", "--device", args.device, "--memory-n", str(args.memory_n),
               "--arch", args.arch]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"]
        result["c_peak_memory_gb_200_seqs"] = round(peak / 1e9, 3)
    print(json.dumps(result, indent=2))
    print(f"(a) extractor / plain forward      = {result['a_extractor_over_plain']:.3f}   (target <= 1.15)")
    target_b = 20 if device.type == "cuda" else 2
    print(f"(b) paper method / extractor       = {result['b_paper_over_extractor']:.2f}    (target >= {target_b})")
    if "c_peak_memory_gb_200_seqs" in result:
        print(f"(c) peak memory, {args.memory_n} sequences      = {result['c_peak_memory_gb_200_seqs']:.3f} GB (target <= 2)")


if __name__ == "__main__":
    main()
