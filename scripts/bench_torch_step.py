#!/usr/bin/python3
"""ms per training step of the PyTorch twin (tests/torch/twin.py): the baseline of `moe-bench train-step`.

The step is the one of apps/train/trainer.cpp: forward, loss CE + alpha LB + z Z (+ beta ED), backward, gradient
clipping, AdamW step, plus what the trainer's loss reports besides the total (each term as a number, the summed
token CE per domain). The model, the batch and the loss options come from a folder laid out as for `twin.py parity`
(`moe-bench train-step` writes it, then runs this script once per variant):
    DIR/model.safetensors  (config JSON in its metadata)  DIR/batch.safetensors  DIR/params.json
By hand:
    OMP_NUM_THREADS=2 /usr/bin/python3 scripts/bench_torch_step.py DIR --threads 2 --steps 20 --warmup 3
    python3 scripts/bench_torch_step.py DIR --device cuda --variant compile_bf16_grouped

Variants (--variant), all on --device:
    eager_fp32            twin.py as it is, f32 (on cuda with TF32 matmuls allowed, PyTorch's usual fp32 training)
    eager_bf16_loop       torch.autocast to bf16; the router in f32 (as moelab's); attention through
                          F.scaled_dot_product_attention (causal) where it exists; the experts as twin.py's loop
    eager_bf16_grouped    the same with the experts as three torch._grouped_mm calls over the tokens sorted by expert
    compile_bf16_grouped  torch.compile of the grouped variant's forward and loss (backward by AOTAutograd; the
                          optimizer stays eager); it compiles during the first (untimed) step
A variant that cannot run here (torch 1.13 has no torch._grouped_mm and no torch.compile) prints one line
    skipped <variant>: <reason>
and exits 0. Otherwise it prints one line per fact, for a program to read:
    variant <variant>
    torch <version>
    threads <torch.get_num_threads()>
    note <text>             (zero or more: what differs from the description above)
    first_step_s <s>        (the first step's wall time: torch.compile compiles there)
    first_loss <the loss of the first step>
    step_ms <ms> <ms> ...   (each timed step, wall clock, the device synchronized before each reading of the clock)
    step_cpu_ms <ms> ...    (each timed step, CPU time of the process: all threads)
    peak_mem_bytes <n>      (cuda only: torch.cuda.max_memory_allocated over the whole run)
    median_ms <the median of the timed steps>
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch"))
import twin  # noqa: E402  (the twin lives with the tests)

VARIANTS = ("eager_fp32", "eager_bf16_loop", "eager_bf16_grouped", "compile_bf16_grouped")


def why_not(variant, device):
    """The reason `variant` cannot run with this torch on `device`, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "torch %s sees no CUDA device" % torch.__version__
    if variant != "eager_fp32" and not hasattr(torch, "autocast"):
        return "torch %s has no torch.autocast" % torch.__version__
    if variant.endswith("grouped") and not hasattr(torch, "_grouped_mm"):
        return "torch %s has no torch._grouped_mm (PyTorch >= 2.8)" % torch.__version__
    if variant.startswith("compile") and not hasattr(torch, "compile"):
        return "torch %s has no torch.compile (PyTorch >= 2.0)" % torch.__version__
    return None


# ---- the bf16 variants' pieces: same math as twin.py, other kernels ---------------------------------------------------


def sdpa_attention(x, p, prefix, cfg, b, t):
    """twin.attention with the causal softmax(q k^T / sqrt(Dh)) v as one fused call (flash attention on a GPU)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    qkv = x @ p[prefix + "attn.wqkv.weight"].t()
    q, k, v = (z.reshape(b, t, h, d // h) for z in qkv.split(d, dim=-1))
    q, k = twin.rope(q, cfg["rope_theta"]), twin.rope(k, cfg["rope_theta"])
    y = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)), is_causal=True)  # [B, H, T, Dh]
    return y.transpose(1, 2).reshape(b * t, d) @ p[prefix + "attn.wo.weight"].t()


def grouped_experts(x, ids, gates, p, prefix, counts):
    """The routed experts as three grouped GEMMs: the N*k (token, expert) slots sorted by expert, each expert's rows
    contiguous, torch._grouped_mm with offs = the end of each expert's rows. x [N, d], ids/gates [N, k] -> [N, d]."""
    k = ids.shape[1]
    order = ids.reshape(-1).argsort(stable=True)  # [N*k] slots by expert, tokens in order within an expert
    token = order // k
    rows = x[token].to(torch.bfloat16)  # [N*k, d]
    offs = counts.cumsum(0).to(torch.int32)  # [E]
    # Weights [E, h, d] (w_down [E, d, h]) as [E, K, N] operands: transposed views, the layout _grouped_mm takes.
    w_gate, w_up, w_down = (p[prefix + "experts." + n].to(torch.bfloat16).transpose(-2, -1)
                            for n in ("w_gate", "w_up", "w_down"))
    hidden = F.silu(torch._grouped_mm(rows, w_gate, offs=offs)) * torch._grouped_mm(rows, w_up, offs=offs)
    y = torch._grouped_mm(hidden, w_down, offs=offs).float() * gates.reshape(-1)[order, None]  # [N*k, d]
    return torch.zeros_like(x).index_add(0, token, y)


def make_bf16_moe(grouped):
    """twin.moe with the router forced to f32 under autocast (moelab computes the router's logits in f32 in every
    mode), expert counts without bincount (a static shape for torch.compile), and the experts as twin.py's loop or
    grouped GEMMs. Same signature as twin.moe, which twin.forward calls."""

    def moe(x, p, prefix, cfg, aux, domains, b, t):
        e, k = cfg["n_experts"], cfg["top_k"]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x.float() @ p[prefix + "router.weight"].t()  # [N, E] f32
        probs = logits.softmax(-1)
        top_p, ids = probs.topk(k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True) if cfg["norm_topk"] else top_p
        counts = (ids.reshape(-1, 1) == torch.arange(e, device=x.device)).sum(0)  # [E] slots per expert
        if grouped:
            out = grouped_experts(x, ids, gates, p, prefix, counts)
        else:
            out = torch.zeros_like(x)
            for i in range(e):
                token, slot = (ids == i).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                y = twin.swiglu(x[token], p[prefix + "experts.w_gate"][i], p[prefix + "experts.w_up"][i],
                                p[prefix + "experts.w_down"][i])
                out = out.index_add(0, token, y.float() * gates[token, slot, None])
        if cfg["shared_experts"] > 0:
            out = out + twin.swiglu(x, p[prefix + "shared.w_gate"], p[prefix + "shared.w_up"],
                                    p[prefix + "shared.w_down"]).float()
        n = x.shape[0]
        f = counts.to(probs.dtype) / (n * k)
        aux["lb"].append(e * (f * probs.mean(0)).sum())
        aux["z"].append(torch.logsumexp(logits, -1).pow(2).mean())
        if domains is not None:
            aux["ed"].append(twin.expert_divergence(probs, domains, b, t, aux["ed_form"], aux["ed_eps"]))
        return out

    return moe


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="model.safetensors, batch.safetensors, params.json")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (moelab's OpenMP threads)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, default="eager_fp32")
    args = parser.parse_args()
    reason = why_not(args.variant, args.device)
    if reason:
        print("skipped %s: %s" % (args.variant, reason), flush=True)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    notes = []
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # f32 products on TF32 tensor cores (eager_fp32, the routers)
        if not args.variant.startswith("compile"):
            torch.set_default_device(device)  # twin.py makes its attention masks without a device

    params, meta = twin.load_safetensors(os.path.join(args.folder, "model.safetensors"))
    cfg = json.loads(meta["config"])
    batch, _ = twin.load_safetensors(os.path.join(args.folder, "batch.safetensors"))
    batch = {name: t.to(device) for name, t in batch.items()}
    with open(os.path.join(args.folder, "params.json")) as f:
        run = json.load(f)
    p = {name: t.to(device).clone().requires_grad_(True) for name, t in params.items()}
    opt = twin.make_adamw(p, run)
    targets = batch["targets"].long()
    domains = batch["domains"].long()
    num_domains = int(run.get("num_domains", int(domains.max()) + 1))
    token_domain = domains.repeat_interleave(batch["inputs"].shape[1])  # [B*T]

    loss_terms = twin.loss_terms
    autocast = contextlib.nullcontext
    if args.variant != "eager_fp32":
        # One process per variant: twin.forward looks these two up in its module when it runs.
        twin.moe = make_bf16_moe(grouped=args.variant.endswith("grouped"))
        if hasattr(F, "scaled_dot_product_attention"):
            twin.attention = sdpa_attention
        else:
            notes.append("no F.scaled_dot_product_attention in torch %s: twin.py's attention" % torch.__version__)
        if args.device == "cpu":
            notes.append("bf16 autocast on the CPU")

        def autocast():
            return torch.autocast(device_type=args.device, dtype=torch.bfloat16)

        if args.variant.startswith("compile"):
            loss_terms = torch.compile(twin.loss_terms)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, terms, logits = loss_terms(p, cfg, batch, run)
        loss.backward()
        if run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(list(p.values()), run["grad_clip"])
        opt.step()
        with torch.no_grad():  # what moelab's MoEModel::loss reports for the log: the terms, CE per domain
            token_ce = F.cross_entropy(logits.detach().float(), targets, reduction="none")
            torch.zeros(num_domains, dtype=torch.float64, device=device).index_add_(0, token_domain, token_ce.double())
            [float(v) for v in terms.values()]
        return loss.item()

    start = time.perf_counter()
    first_loss = step()
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
        times.append((time.perf_counter() - start) * 1e3)
    print("variant", args.variant)
    print("torch", torch.__version__)
    print("threads", torch.get_num_threads())
    for note in notes:
        print("note", note)
    print("first_step_s", "%.3f" % first_step_s)
    print("first_loss", repr(first_loss))
    print("step_ms", " ".join("%.3f" % t for t in times))
    print("step_cpu_ms", " ".join("%.3f" % t for t in cpu_times))
    if args.device == "cuda":
        print("peak_mem_bytes", torch.cuda.max_memory_allocated())
    print("median_ms", "%.4f" % statistics.median(times), flush=True)


if __name__ == "__main__":
    main()
