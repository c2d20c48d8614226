#!/usr/bin/python3
"""One MoE layer's experts in PyTorch, forward and backward: the baseline of `moe-bench experts`.

`moe-bench experts` writes DIR/experts.safetensors: the inputs x [N, d], ids (i32) and gates [N, k], w_gate and
w_up [E, h, d], w_down [E, d, h], the output gradient dy [N, d], and its own results for each precision P in fp32
and bf16: y_P, dx_P, dgates_P, dw_gate_P, dw_up_P, dw_down_P. This script computes
    y[n] = sum_j gates[n, j] * w_down[e] (silu(w_gate[e] x[n]) * (w_up[e] x[n])),  e = ids[n, j]
and its gradients from dy on --device, three ways:
    loop_fp32        a loop over the experts (tests/torch/twin.py's), f32 (strict: no TF32, as moelab's fp32)
    loop_bf16        the same loop under torch.autocast to bf16
    grouped_mm_bf16  the slots sorted by expert and three torch._grouped_mm calls (scripts/bench_torch_step.py's
                     grouped variant; PyTorch >= 2.8 on a GPU that has it)
times each pass, and compares the results with moelab's of the same precision. By hand:
    python3 scripts/bench_torch_experts.py DIR --device cuda --steps 20 --warmup 3
It prints one JSON line, last:
    {"torch": version, "variants": [{"name", "precision", "forward_ms", "backward_ms", "errors": {"y", "dx",
    "dgates", "dw_gate", "dw_up", "dw_down"}} or {"name", "precision", "skipped": reason}, ...]}
forward_ms and backward_ms are medians of the timed steps (CUDA events on a GPU, the wall clock on the CPU); each
error is ||torch - moelab|| / ||moelab||.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"  # loop_fp32 is strict f32 (NVIDIA's containers set it to 1)
import torch  # noqa: E402  (after the environment it reads)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch"))
import twin  # noqa: E402  (the twin lives with the tests)
import bench_torch_step  # noqa: E402  (the race's grouped experts, next to this script)

VARIANTS = (("loop_fp32", "fp32"), ("loop_bf16", "bf16"), ("grouped_mm_bf16", "bf16"))
RESULTS = ("y", "dx", "dgates", "dw_gate", "dw_up", "dw_down")


def loop_experts(x, ids, gates, w_gate, w_up, w_down):
    """twin.moe's loop over the experts: each expert's tokens, its SwiGLU, added back with their gates."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = twin.swiglu(x[token], w_gate[e], w_up[e], w_down[e])
        out = out.index_add(0, token, y.float() * gates[token, slot, None])
    return out


def grouped_experts(x, ids, gates, w_gate, w_up, w_down):
    counts = torch.bincount(ids.reshape(-1), minlength=w_gate.shape[0])
    p = {"experts.w_gate": w_gate, "experts.w_up": w_up, "experts.w_down": w_down}
    return bench_torch_step.grouped_experts(x, ids, gates, p, "", counts)


def why_not(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        return "torch %s sees no CUDA device" % torch.__version__
    if name.endswith("bf16") and not hasattr(torch, "autocast"):
        return "torch %s has no torch.autocast" % torch.__version__
    if name.startswith("grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return "torch %s has no torch._grouped_mm (PyTorch >= 2.8)" % torch.__version__
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="holds experts.safetensors")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    tensors, _ = twin.load_safetensors(os.path.join(args.folder, "experts.safetensors"))
    if args.device == "cuda":  # (Debian's CPU-only torch 1.13 ran the f32 loop's forward 30 times slower with it)
        torch.backends.cuda.matmul.allow_tf32 = False  # strict f32 (loop_fp32), whatever the defaults
    variants = []
    for name, precision in VARIANTS:
        reason = why_not(name, args.device)
        if reason:
            variants.append({"name": name, "precision": precision, "skipped": reason})
            continue
        x, gates, w_gate, w_up, w_down = (tensors[n].to(args.device).requires_grad_(True)
                                          for n in ("x", "gates", "w_gate", "w_up", "w_down"))
        leaves = (x, gates, w_gate, w_up, w_down)
        ids, dy = tensors["ids"].to(args.device).long(), tensors["dy"].to(args.device)
        experts = grouped_experts if name.startswith("grouped_mm") else loop_experts
        autocast = (lambda: torch.autocast(device_type=args.device, dtype=torch.bfloat16)) \
            if name == "loop_bf16" else contextlib.nullcontext

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
        try:
            for step in range(args.warmup + args.steps):
                for t in leaves:
                    t.grad = None
                start = clock()
                with autocast():
                    y = experts(x, ids, gates, w_gate, w_up, w_down)
                middle = clock()
                y.backward(dy)
                end = clock()
                if step >= args.warmup:
                    forward_ms.append(ms(start, middle))
                    backward_ms.append(ms(middle, end))
        except RuntimeError as e:  # e.g. _grouped_mm on a GPU or CPU it does not support
            variants.append({"name": name, "precision": precision, "skipped": str(e).split("\n")[0][:200]})
            continue

        def error(t, ours):  # None (JSON null) when not finite: JSON has no NaN
            t = t.detach().float().cpu()
            e = ((t - ours).norm() / ours.norm()).item()
            return e if math.isfinite(e) else None

        errors = {"y": error(y, tensors["y_" + precision])}
        for result, t in zip(RESULTS[1:], leaves):
            errors[result] = error(t.grad, tensors["%s_%s" % (result, precision)])
        variants.append({"name": name, "precision": precision, "forward_ms": statistics.median(forward_ms),
                         "backward_ms": statistics.median(backward_ms), "errors": errors})
    print(json.dumps({"torch": torch.__version__, "variants": variants}))


if __name__ == "__main__":
    main()
