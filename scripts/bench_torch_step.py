#!/usr/bin/python3
"""ms per training step of the PyTorch twin (tests/torch/twin.py) on the CPU: the baseline of `moe-bench train-step`.

The step is the one of apps/train/trainer.cpp: forward, loss CE + alpha LB + z Z (+ beta ED), backward, gradient
clipping, AdamW step, plus what the trainer's loss reports besides the total (each term as a number, the summed
token CE per domain). The model, the batch and the loss options come from a folder laid out as for `twin.py parity`
(`moe-bench train-step` writes it, then runs this script with Debian's /usr/bin/python3):
    DIR/model.safetensors  (config JSON in its metadata)  DIR/batch.safetensors  DIR/params.json
By hand:
    OMP_NUM_THREADS=2 /usr/bin/python3 scripts/bench_torch_step.py DIR --threads 2 --steps 20 --warmup 3

Prints one line per fact, for a program to read:
    torch <version>
    threads <torch.get_num_threads()>
    first_loss <the loss of the first step>
    step_ms <ms> <ms> ...   (each timed step, wall clock)
    step_cpu_ms <ms> ...    (each timed step, CPU time of the process: all threads)
    median_ms <the median of the timed steps>
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
import twin  # noqa: E402  (the twin lives with the tests)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="model.safetensors, batch.safetensors, params.json")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (moelab's OpenMP threads)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    params, meta = twin.load_safetensors(os.path.join(args.folder, "model.safetensors"))
    cfg = json.loads(meta["config"])
    batch, _ = twin.load_safetensors(os.path.join(args.folder, "batch.safetensors"))
    with open(os.path.join(args.folder, "params.json")) as f:
        run = json.load(f)
    p = {name: t.clone().requires_grad_(True) for name, t in params.items()}
    opt = twin.make_adamw(p, run)
    targets = batch["targets"].long()
    domains = batch["domains"].long()
    num_domains = int(run.get("num_domains", int(domains.max()) + 1))
    token_domain = domains.repeat_interleave(batch["inputs"].shape[1])  # [B*T]

    def step():
        opt.zero_grad(set_to_none=True)
        loss, terms, logits = twin.loss_terms(p, cfg, batch, run)
        loss.backward()
        if run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(list(p.values()), run["grad_clip"])
        opt.step()
        with torch.no_grad():  # what moelab's MoEModel::loss reports for the log: the terms, CE per domain
            token_ce = F.cross_entropy(logits.detach(), targets, reduction="none")
            torch.zeros(num_domains, dtype=torch.float64).index_add_(0, token_domain, token_ce.double())
            [float(v) for v in terms.values()]
        return loss.item()

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
        times.append((time.perf_counter() - start) * 1e3)
    print("torch", torch.__version__)
    print("threads", torch.get_num_threads())
    print("first_loss", repr(first_loss))
    print("step_ms", " ".join("%.3f" % t for t in times))
    print("step_cpu_ms", " ".join("%.3f" % t for t in cpu_times))
    print("median_ms", "%.4f" % statistics.median(times), flush=True)


if __name__ == "__main__":
    main()
