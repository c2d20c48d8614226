#!/usr/bin/python3
"""torch.optim.AdamW as the oracle of moelab's AdamW (used by tests/test_omoe.cpp).

    /usr/bin/python3 tests/torch/adamw_oracle.py case.json result.json

case.json (written by the C++ test):
    {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "lr": [lr of step 1, ..., lr of step T],
     "params": [{"name": ..., "shape": [...], "data": [...]}, ...],
     "grads":  [[flat gradient of param 0, of param 1, ...] for step 1, ..., for step T]}
Weight decay applies to matrices only (dim >= 2), as in moelab: two parameter groups. Everything is float32.

result.json: {"torch_version": ..., "params": [flat data of each parameter after T steps, ...]}
"""
import json
import sys

import torch


def main():
    case_path, result_path = sys.argv[1], sys.argv[2]
    with open(case_path) as f:
        case = json.load(f)
    params = [torch.tensor(p["data"], dtype=torch.float32).reshape(p["shape"]).requires_grad_() for p in case["params"]]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": case["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=case["lr"][0], betas=(case["beta1"], case["beta2"]), eps=case["eps"])
    for lr, grads in zip(case["lr"], case["grads"]):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32).reshape(p.shape)
        optimizer.step()
    with open(result_path, "w") as f:
        json.dump({"torch_version": torch.__version__, "params": [p.detach().reshape(-1).tolist() for p in params]}, f)


if __name__ == "__main__":
    main()
