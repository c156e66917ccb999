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

    (d) roofline: achieved TFLOP/s of the plain forward, the extractor and the paper's method (matrix FLOPs
        counted by torch for the very call timed, see ``roofline.py``), as a fraction of a large matmul's
        rate in the same dtype and process, and of the GPU's dense datasheet peak where it is known.
        Target on an H100: the extractor at >= 35% of the bf16 dense peak.

--dtype: float32 (full fp32 matmuls), tf32 (fp32 weights, TF32 tensor-core matmuls; CUDA only) or bfloat16, for
the extractor and the plain forward; the paper's method always runs float32 with full-precision matmuls.
--profile: also prints torch.profiler's top operators of one extractor call (device time on CUDA), to see what
stands between the extractor and the roofline (launches, copies, the recorder, Python).

Usage: python benchmarks/bench_extractor.py [--arch bert|llama|modernbert] [--device cpu|cuda]
           [--dtype float32|tf32|bfloat16] [--n 16] [--batch-size 16] [--repeats 3] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys

import torch

from roofline import count_flops, datasheet_peak, measured_matmul_peak, roofline, sync, timed

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


def torch_dtype(name: str) -> torch.dtype:
    """The weights' dtype of a --dtype choice (tf32 keeps fp32 weights; only the matmuls change)."""
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def peak_memory_child(device_name: str, n: int, batch_size: int | None, arch: str, dtype: str) -> None:
    """Run in a fresh process so that ru_maxrss reflects the extractor alone."""
    from attnlab import extract_attention

    device = torch.device(device_name)
    lm = bert_base(device, torch_dtype(dtype), arch=arch)
    ids, mask, qpos = rrt_batch(n, seed=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extract_attention(lm, ids, mask, qpos, batch_size=batch_size)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_bytes": peak}))


@contextlib.contextmanager
def matmul_precision(precision: str):
    """fp32 matmuls in full precision, or on TF32 tensor cores (``precision == "tf32"``), inside the block."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def profile_table(fn, device, rows: int = 15) -> str:
    """torch.profiler's top operators of one call of ``fn`` (by device time on CUDA, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up outside the trace
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="bert", choices=["bert", "llama", "modernbert"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="sequences timed in (a), (b) and (d)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "tf32", "bfloat16"],
                    help="precision of the extractor and plain forward; the paper's method always runs float32")
    ap.add_argument("--profile", action="store_true", help="print the profiler's top operators of one extractor call")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        return peak_memory_child(args.device, args.memory_n, args.batch_size, args.arch, args.dtype)

    from attnlab import extract_attention

    device = torch.device(args.device)
    if args.dtype == "tf32" and device.type != "cuda":
        ap.error("--dtype tf32 needs --device cuda (TF32 is a GPU tensor-core format)")
    n = args.n or (64 if device.type == "cuda" else 8)
    torch.set_grad_enabled(False)
    lm = bert_base(device, arch=args.arch)
    eager = copy.deepcopy(lm.model)  # the paper's method: float32, eager attention
    eager.set_attn_implementation("eager")
    dtype = torch_dtype(args.dtype)
    lm.model.to(dtype)
    ids, mask, qpos = rrt_batch(n)
    batch_size = args.batch_size or n

    def plain():
        with matmul_precision(args.dtype):
            for s in range(0, n, batch_size):
                lm.base(input_ids=ids[s:s + batch_size].to(device), attention_mask=mask[s:s + batch_size].to(device))

    def extractor():
        with matmul_precision(args.dtype):
            extract_attention(lm, ids, mask, qpos, batch_size=batch_size)

    def paper_method():
        with matmul_precision("float32"):
            for i in range(n):
                out = eager(input_ids=ids[i:i + 1].to(device), output_attentions=True)
                torch.stack([a[0, :, qpos[i, 0]] for a in out.attentions]).cpu()

    t_plain = timed(plain, device, args.repeats)
    t_extract = timed(extractor, device, args.repeats)
    t_paper = timed(paper_method, device, max(1, args.repeats - 1))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "device": device_name,
        "arch": args.arch, "dtype": args.dtype, "sequences": n, "seq_len": SEQ_LEN, "batch_size": batch_size,
        "plain_forward_s": round(t_plain, 4), "extractor_s": round(t_extract, 4), "paper_method_s": round(t_paper, 4),
        "a_extractor_over_plain": round(t_extract / t_plain, 3),
        "b_paper_over_extractor": round(t_paper / t_extract, 2),
    }
    # (d) roofline: FLOPs of the calls just timed, against this dtype's matmul rate and the datasheet
    with matmul_precision(args.dtype):
        peak_measured = measured_matmul_peak(device, dtype)
    with matmul_precision("float32"):
        peak_measured_fp32 = peak_measured if args.dtype == "float32" else measured_matmul_peak(device, torch.float32)
    peak_sheet = datasheet_peak(device_name, args.dtype) if device.type == "cuda" else None
    peak_sheet_fp32 = datasheet_peak(device_name, "float32") if device.type == "cuda" else None
    d = result["d_roofline"] = {
        "matmul_peak_measured_tflops": round(peak_measured, 3),
        "datasheet_dense_peak_tflops": peak_sheet,
    }
    for name, fn, seconds, peaks in (("plain_forward", plain, t_plain, (peak_measured, peak_sheet)),
                                     ("extractor", extractor, t_extract, (peak_measured, peak_sheet)),
                                     ("paper_method", paper_method, t_paper, (peak_measured_fp32, peak_sheet_fp32))):
        flops = count_flops(fn)
        d[name] = {"gflop": round(flops / 1e9, 2), **roofline(flops, seconds, *peaks)}
    d["paper_method"]["precision"] = "float32"
    if not args.skip_memory:
        cmd = [sys.executable, __file__, "--_memory-child", "--device", args.device, "--memory-n", str(args.memory_n),
               "--arch", args.arch, "--dtype", args.dtype]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"]
        result["c_peak_memory_gb_200_seqs"] = round(peak / 1e9, 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"(a) extractor / plain forward      = {result['a_extractor_over_plain']:.3f}   (target <= 1.15)")
    target_b = 20 if device.type == "cuda" else 2
    print(f"(b) paper method / extractor       = {result['b_paper_over_extractor']:.2f}    (target >= {target_b})")
    if "c_peak_memory_gb_200_seqs" in result:
        print(f"(c) peak memory, {args.memory_n} sequences      = {result['c_peak_memory_gb_200_seqs']:.3f} GB (target <= 2)")
    for name in ("plain_forward", "extractor", "paper_method"):
        r = d[name]
        sheet = "" if r["of_datasheet_peak"] is None else f", {100 * r['of_datasheet_peak']:.1f}% of the dense datasheet peak"
        print(f"(d) {name:<15} {r['gflop']:>9.1f} GFLOP  {r['tflops']:8.3f} TFLOP/s = "
              f"{100 * r['of_measured_peak']:.1f}% of a large matmul here{sheet}")
    if device.type == "cuda" and args.dtype == "bfloat16":
        print("    (target on an H100: extractor >= 35% of the bf16 dense peak)")
    if args.profile:
        print(profile_table(extractor, device))


if __name__ == "__main__":
    main()
