#!/usr/bin/python3
"""Causal attention's forward and backward in PyTorch: the baseline of `moe-bench attention`.

`moe-bench attention` writes DIR/attention.safetensors: the inputs q, k, v and the output gradient g, all f32
[B, T, H, Dh], and its own results for each precision P in fp32 and bf16: out_P, dq_P, dk_P, dv_P. This script runs
F.scaled_dot_product_attention (is_causal=True; flash attention on a GPU in bf16) in both precisions on --device,
forward then backward with g, times each pass, and compares its output and gradients with moelab's of the same
precision. Where torch has no scaled_dot_product_attention (torch 1.13, Debian's) it uses the explicit masked softmax
instead and says so in the variant's name. By hand:
    python3 scripts/bench_torch_attention.py DIR --device cuda --steps 20 --warmup 3
It prints one JSON line, last:
    {"torch": version, "variants": [{"name", "precision", "forward_ms", "backward_ms", "errors": {"out", "dq", "dk",
    "dv"}} or {"name", "precision", "skipped": reason}, ...]}
forward_ms and backward_ms are medians of the timed steps (CUDA events on a GPU, the wall clock on the CPU); each
error is ||torch - moelab|| / ||moelab||.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch"))
import twin  # noqa: E402  (the twin lives with the tests; its safetensors reader)


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(Dh) + causal mask) v for [B, H, T, Dh] tensors."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="holds attention.safetensors")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    tensors, _ = twin.load_safetensors(os.path.join(args.folder, "attention.safetensors"))
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    attention = (lambda q, k, v: sdpa(q, k, v, is_causal=True)) if sdpa else explicit_attention
    kind = "sdpa" if sdpa else "explicit"
    variants = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        name = "%s_%s" % (kind, precision)
        if args.device == "cuda" and not torch.cuda.is_available():
            variants.append({"name": name, "precision": precision,
                             "skipped": "torch %s sees no CUDA device" % torch.__version__})
            continue
        # [B, T, H, Dh] -> [B, H, T, Dh], the layout attention takes
        q, k, v, g = (tensors[n].to(args.device, dtype).transpose(1, 2).contiguous() for n in "qkvg")
        for x in (q, k, v):
            x.requires_grad_(True)

        def clock():
            if args.device == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            return time.perf_counter()

        def ms(start, end):
            if args.device == "cuda":
                end.synchronize()
                return start.elapsed_time(end)
            return (end - start) * 1e3

        forward_ms, backward_ms = [], []
        for step in range(args.warmup + args.steps):
            for x in (q, k, v):
                x.grad = None
            start = clock()
            out = attention(q, k, v)
            middle = clock()
            out.backward(g)
            end = clock()
            if step >= args.warmup:
                forward_ms.append(ms(start, middle))
                backward_ms.append(ms(middle, end))

        def error(x, ours):
            x = x.detach().transpose(1, 2).float().cpu()
            return ((x - ours).norm() / ours.norm()).item()

        errors = {"out": error(out, tensors["out_" + precision])}
        for n, x in (("dq", q), ("dk", k), ("dv", v)):
            errors[n] = error(x.grad, tensors["%s_%s" % (n, precision)])
        variants.append({"name": name, "precision": precision, "forward_ms": statistics.median(forward_ms),
                         "backward_ms": statistics.median(backward_ms), "errors": errors})
    print(json.dumps({"torch": torch.__version__, "variants": variants}))


if __name__ == "__main__":
    main()
