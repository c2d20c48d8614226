#!/usr/bin/python3
"""PyTorch as an independent oracle for moelab's ops (used by tests/test_torch_oracle.cpp).

    /usr/bin/python3 tests/torch/op_oracle.py cases.json results.json

cases.json (written by the C++ test):
    {"cases": [{"name": "add_bcast", "op": "add", "attrs": {...},
                "inputs":  [{"dtype": "f32", "shape": [3, 5], "data": [...], "grad": true}, ...],
                "weights": [{"dtype": "f32", "shape": [3, 5], "data": [...]} or null, ...]}]}
Each case runs one op in float32 on the given inputs. Its scalar loss is sum_k sum(outputs[k] * weights[k]) over
the outputs that have weights, so the gradient of each input marked "grad" is a vector-Jacobian product with the
weights as the upstream gradient.

results.json (read back by the C++ test):
    {"torch_version": "1.13.0", "cases": [{"name": ..., "error": null or "message",
                                           "outputs": [tensor, ...], "grads": [tensor or null, ...]}]}
Tensors are {"dtype", "shape", "data"} with data flat in row-major order. A case that raises reports its error and
the others still run. Works with PyTorch 1.13 (Debian's python3-torch) and 2.x; CPU only, no other dependency.
"""
import json
import math
import sys
import traceback

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f64": torch.float64, "i32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}


def to_torch(t):
    x = torch.tensor(t["data"], dtype=DTYPES[t["dtype"]])
    return x.reshape(t["shape"])


def to_json(x):
    x = x.detach().contiguous()
    if x.dtype == torch.int64:  # torch's index results; moelab's indices are i32
        x = x.to(torch.int32)
    if x.dtype not in NAMES:
        raise TypeError(f"unexpected result dtype {x.dtype}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"non-finite values in a torch result of shape {list(x.shape)}: pick tamer inputs")
    return {"dtype": NAMES[x.dtype], "shape": list(x.shape), "data": x.reshape(-1).tolist()}


# ---- the ops: each takes (inputs, attrs) and returns a list of output tensors ------------------------------------------
# Fused ops are written from torch's own primitives, straight from the formula each one documents in engine/ops.h.


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta, pos_offset):
    """x [B, T, H, Dh]; pair (2i, 2i+1) rotates by angle (pos_offset + t) * theta^(-2i/Dh)."""
    _, T, _, Dh = x.shape
    # Angles in float64, then cos/sin rounded once to float32: the rotation the formula means, without float32
    # error in the angle itself (which grows with t).
    i = torch.arange(Dh // 2, dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64) + pos_offset
    angle = t[:, None] * theta ** (-2.0 * i / Dh)  # [T, Dh/2]
    cos = torch.cos(angle).to(x.dtype)[None, :, None, :]  # [1, T, 1, Dh/2]
    sin = torch.sin(angle).to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v with a causal mask, written out; layout [B, T, H, Dh]."""
    _, T, _, Dh = q.shape
    qh, kh, vh = (a.transpose(1, 2) for a in (q, k, v))  # [B, H, T, Dh]
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(Dh)  # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return (probs @ vh).transpose(1, 2)  # [B, T, H, Dh]


def matmul(a, b, trans_a, trans_b):
    if trans_a:
        a = a.transpose(-1, -2)
    if trans_b:
        b = b.transpose(-1, -2)
    return a @ b


def long(i):
    return i.to(torch.int64)


def sum_op(x, a):
    return x.sum() if "dim" not in a else x.sum(a["dim"], keepdim=a.get("keepdim", False))


def mean_op(x, a):
    return x.mean() if "dim" not in a else x.mean(a["dim"], keepdim=a.get("keepdim", False))


def max_op(x, a):
    return x.max() if "dim" not in a else x.max(a["dim"], keepdim=a.get("keepdim", False)).values


OPS = {
    # pointwise, broadcasting like NumPy
    "add": lambda x, a: [x[0] + x[1]],
    "sub": lambda x, a: [x[0] - x[1]],
    "mul": lambda x, a: [x[0] * x[1]],
    "mul_self": lambda x, a: [x[0] * x[0]],  # one tensor used twice: its gradient accumulates
    "div": lambda x, a: [x[0] / x[1]],
    "add_scalar": lambda x, a: [x[0] + a["s"]],
    "mul_scalar": lambda x, a: [x[0] * a["s"]],
    "rsub_scalar": lambda x, a: [a["s"] - x[0]],
    "rdiv_scalar": lambda x, a: [a["s"] / x[0]],
    "neg": lambda x, a: [-x[0]],
    "exp": lambda x, a: [torch.exp(x[0])],
    "log": lambda x, a: [torch.log(x[0])],
    "sqrt": lambda x, a: [torch.sqrt(x[0])],
    "rsqrt": lambda x, a: [torch.rsqrt(x[0])],
    "square": lambda x, a: [torch.square(x[0])],
    "tanh": lambda x, a: [torch.tanh(x[0])],
    "sigmoid": lambda x, a: [torch.sigmoid(x[0])],
    "silu": lambda x, a: [F.silu(x[0])],
    "expand": lambda x, a: [x[0].expand(a["shape"])],
    # reductions
    "sum": lambda x, a: [sum_op(x[0], a)],
    "mean": lambda x, a: [mean_op(x[0], a)],
    "max": lambda x, a: [max_op(x[0], a)],
    "softmax": lambda x, a: [torch.softmax(x[0], dim=-1)],
    "log_softmax": lambda x, a: [torch.log_softmax(x[0], dim=-1)],
    "cumsum": lambda x, a: [torch.cumsum(x[0], dim=-1, dtype=x[0].dtype)],
    # matrix products
    "matmul": lambda x, a: [matmul(x[0], x[1], a.get("trans_a", False), a.get("trans_b", False))],
    # indexing
    "index_select": lambda x, a: [torch.index_select(x[0], a["dim"], long(x[1]))],
    "gather": lambda x, a: [torch.gather(x[0], a["dim"], long(x[1]))],
    "scatter_add": lambda x, a: [torch.scatter_add(x[0], a["dim"], long(x[1]), x[2])],
    "index_add": lambda x, a: [torch.index_add(x[0], a["dim"], long(x[1]), x[2])],
    "embedding": lambda x, a: [F.embedding(long(x[1]), x[0])],
    "where": lambda x, a: [torch.where(x[0] != 0, x[1], x[2])],
    "masked_fill": lambda x, a: [x[0].masked_fill(x[1] != 0, a["value"])],
    "topk": lambda x, a: list(torch.topk(x[0], a["k"], dim=-1, largest=True, sorted=True)),
    "argsort": lambda x, a: [torch.argsort(x[0], dim=-1, descending=a.get("descending", False))],
    "bincount": lambda x, a: [torch.bincount(long(x[0]), minlength=a["bins"])],
    # fused neural-net ops
    "cross_entropy": lambda x, a: [F.cross_entropy(x[0], long(x[1]), ignore_index=a.get("ignore_index", -100))],
    "rms_norm": lambda x, a: [rms_norm(x[0], x[1], a.get("eps", 1e-5))],
    "rope": lambda x, a: [rope(x[0], a.get("theta", 10000.0), a.get("pos_offset", 0))],
    "causal_attention": lambda x, a: [causal_attention(x[0], x[1], x[2])],
    # shapes
    "reshape": lambda x, a: [x[0].reshape(a["shape"])],
    "slice_rows": lambda x, a: [x[0][a["start"]:a["end"]]],
    "transpose": lambda x, a: [x[0].transpose(a["dim0"], a["dim1"])],
    "permute": lambda x, a: [x[0].permute(a["dims"])],
    "concat": lambda x, a: [torch.cat(x, dim=a["dim"])],
    "split": lambda x, a: list(torch.split(x[0], a["sizes"], dim=a["dim"])),
}


def run_case(case):
    if case["op"] not in OPS:
        raise KeyError(f"op_oracle.py knows no op {case['op']!r}")
    inputs = [to_torch(t) for t in case["inputs"]]
    wants_grad = [t.get("grad", False) for t in case["inputs"]]
    for x, g in zip(inputs, wants_grad):
        if g:
            x.requires_grad_(True)
    outputs = OPS[case["op"]](inputs, case.get("attrs", {}))
    weights = case.get("weights", [])
    if len(weights) != len(outputs):
        raise ValueError(f"torch gives {len(outputs)} outputs, the case has {len(weights)} weights")
    result = {"name": case["name"], "error": None, "outputs": [to_json(y) for y in outputs], "grads": []}

    leaves = [x for x, g in zip(inputs, wants_grad) if g]
    terms = []
    for y, w in zip(outputs, weights):
        if w is None:
            continue
        w = to_torch(w)
        if tuple(w.shape) != tuple(y.shape):
            raise ValueError(f"torch output shape {list(y.shape)} != weights shape {list(w.shape)}")
        terms.append((y * w).sum())
    grads = [None] * len(leaves)
    if leaves and terms:
        loss = torch.stack(terms).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    it = iter(grads)
    for x, g in zip(inputs, wants_grad):
        if not g:
            result["grads"].append(None)
            continue
        grad = next(it)
        result["grads"].append(to_json(grad if grad is not None else torch.zeros_like(x)))
    return result


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} cases.json results.json", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # reproducible reductions, and the C++ test's cores stay free
    with open(argv[1]) as f:
        cases = json.load(f)["cases"]
    results = []
    for case in cases:
        try:
            results.append(run_case(case))
        except Exception as e:  # one bad case must not hide the others
            results.append({"name": case.get("name", "?"), "error": f"{type(e).__name__}: {e}",
                            "trace": traceback.format_exc(), "outputs": [], "grads": []})
    with open(argv[2], "w") as f:
        json.dump({"torch_version": torch.__version__, "cases": results}, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
