"""The PyTorch twin of moelab's reference model (docs/model.md), for parity tests and speed comparisons.

Written to run on Debian's python3-torch 1.13 (CPU) and on PyTorch 2.x. It reads and writes moelab checkpoints
(safetensors, parsed here with json + numpy so no extra package is needed).

    python3 twin.py parity DIR     # DIR/model.safetensors, DIR/batch.safetensors, DIR/params.json -> DIR/out.safetensors
    python3 twin.py parity DIR --f64   # the same in float64 -> DIR/out_f64.safetensors (a reference for both sides)

out.safetensors holds the weights after params["steps"] AdamW steps (same names as the checkpoint) and, for tracing a
disagreement to its first cause: "losses" [steps] (f64), "grad_norms" [steps] (before clipping, f64), the loss terms
of the first step "ce", "lb", "z", "ed" (f64 scalars; aux terms are means over MoE layers, before coefficients),
"logits" [B*T, V] of the first forward, and "grad.<name>" for every parameter's gradient of the first step (before
clipping).
"""
import json
import math
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ---- safetensors ---------------------------------------------------------------------------------------------------

_DTYPES = {"F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64), "I32": (np.int32, torch.int32)}


def load_safetensors(path):
    """Returns ({name: tensor}, metadata)."""
    with open(path, "rb") as f:
        raw = f.read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        np_dtype, _ = _DTYPES[entry["dtype"]]
        array = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(entry["shape"]).copy()
        tensors[name] = torch.from_numpy(array)
    return tensors, meta


def save_safetensors(path, tensors, metadata=None):
    names = {torch.float32: "F32", torch.float64: "F64", torch.int32: "I32"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# ---- the model -----------------------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x [B, T, H, Dh]: rotate pairs (2i, 2i+1) of position t by angle t * theta^(-2i/Dh)."""
    _, t, _, dh = x.shape
    inv_freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64, device=x.device) / dh)
    angle = torch.arange(t, dtype=torch.float64, device=x.device)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    cos = angle.cos().to(x.dtype)[None, :, None, :]
    sin = angle.sin().to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def attention(x, p, prefix, cfg, b, t):
    d, h = cfg["d_model"], cfg["n_heads"]
    qkv = x @ p[prefix + "attn.wqkv.weight"].t()
    q, k, v = (z.reshape(b, t, h, d // h) for z in qkv.split(d, dim=-1))
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, Dh]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(b * t, d) @ p[prefix + "attn.wo.weight"].t()


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def moe(x, p, prefix, cfg, aux, domains, b, t):
    """Dropless top-k MoE as plainly as possible: a loop over experts."""
    e, k = cfg["n_experts"], cfg["top_k"]
    logits = x.to(torch.promote_types(x.dtype, torch.float32)) @ p[prefix + "router.weight"].t()  # [N, E], >= fp32
    probs = logits.softmax(-1)
    top_p, ids = probs.topk(k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True) if cfg["norm_topk"] else top_p
    out = torch.zeros_like(x)
    for i in range(e):
        token, slot = (ids == i).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = swiglu(x[token], p[prefix + "experts.w_gate"][i], p[prefix + "experts.w_up"][i], p[prefix + "experts.w_down"][i])
        out = out.index_add(0, token, y * gates[token, slot, None])
    if cfg["shared_experts"] > 0:
        out = out + swiglu(x, p[prefix + "shared.w_gate"], p[prefix + "shared.w_up"], p[prefix + "shared.w_down"])
    n = x.shape[0]
    f = torch.bincount(ids.flatten(), minlength=e).to(probs.dtype) / (n * k)
    aux["lb"].append(e * (f * probs.mean(0)).sum())
    aux["z"].append(torch.logsumexp(logits, -1).pow(2).mean())
    if domains is not None:
        aux["ed"].append(expert_divergence(probs, domains, b, t, aux["ed_form"], aux["ed_eps"]))
    return out


def kl(p, q):
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def expert_divergence(probs, domains, b, t, form, eps):
    """docs/objective.md. In float64: at initialization the domains route almost alike, the JSD is ~1e-5 and comes out of the
    cancellation of terms ~0.3, so float32 would leave it with a relative error ~1e-3 (and -log(JSD) with ~1e-3
    absolute). moelab computes this loss in double for the same reason; the result is cast back to probs' type."""
    seq_mean = probs.double().reshape(b, t, -1).mean(1)  # [B, E]
    present = sorted(set(domains.tolist()))
    if len(present) < 2:
        return None
    q = [seq_mean[domains == j].mean(0) for j in present]
    terms = []
    for a in range(len(q)):
        for c in range(a + 1, len(q)):
            m = 0.5 * (q[a] + q[c])
            jsd = 0.5 * kl(q[a], m) + 0.5 * kl(q[c], m)
            terms.append(-torch.log(jsd + eps) if form == "neglog" else -jsd)
    return torch.stack(terms).mean().to(probs.dtype)


def is_moe_layer(cfg, layer):
    return cfg["n_experts"] > 0 and layer not in cfg["dense_layers"] and (layer + 1) % cfg["moe_every"] == 0


def forward(p, cfg, ids, domains=None, ed_form="neglog", ed_eps=1e-6):
    """ids [B, T] -> logits [B*T, V], aux losses {name: [per-layer scalars]}."""
    b, t = ids.shape
    eps = cfg["norm_eps"]
    aux = {"lb": [], "z": [], "ed": [], "ed_form": ed_form, "ed_eps": ed_eps}
    x = p["tok_emb.weight"][ids.reshape(-1).long()]
    for layer in range(cfg["n_layers"]):
        pre = "layers.%d." % layer
        x = x + attention(rms_norm(x, p[pre + "attn_norm.weight"], eps), p, pre, cfg, b, t)
        h = rms_norm(x, p[pre + "ffn_norm.weight"], eps)
        if is_moe_layer(cfg, layer):
            x = x + moe(h, p, pre + "moe.", cfg, aux, domains, b, t)
        else:
            x = x + swiglu(h, p[pre + "mlp.w_gate"], p[pre + "mlp.w_up"], p[pre + "mlp.w_down"])
    x = rms_norm(x, p["final_norm.weight"], eps)
    head = p["tok_emb.weight"] if cfg["tie_embeddings"] else p["lm_head.weight"]
    aux["ed"] = [v for v in aux["ed"] if v is not None]
    return x @ head.t(), aux


def loss_terms(p, cfg, batch, coef):
    """-> (total loss, {"ce", "lb", "z", "ed": the terms, aux ones averaged over MoE layers}, logits [B*T, V]).
    A term whose coefficient is 0 is not computed (as in moelab's MoEModel) and reads 0."""
    domains = batch.get("domains") if coef["beta"] != 0 else None
    logits, aux = forward(p, cfg, batch["inputs"], domains, coef["ed_form"], coef["ed_eps"])
    ce = F.cross_entropy(logits, batch["targets"].long())
    loss, terms = ce, {"ce": ce.detach(), "lb": 0.0, "z": 0.0, "ed": 0.0}
    for name, c in (("lb", coef["alpha"]), ("z", coef["z_coef"]), ("ed", coef["beta"])):
        if aux[name] and c != 0:
            term = torch.stack(aux[name]).mean()
            terms[name] = term.detach()
            loss = loss + c * term
    return loss, terms, logits


def total_loss(p, cfg, batch, coef):
    return loss_terms(p, cfg, batch, coef)[0]


def make_adamw(p, run):
    """torch.optim.AdamW with weight decay on matrices only (dim >= 2), as moelab's optim::AdamW."""
    decay = [t for t in p.values() if t.dim() >= 2]
    no_decay = [t for t in p.values() if t.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": run["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run["lr"], betas=(run["beta1"], run["beta2"]), eps=run["eps"])


# ---- parity: loss on a fixed batch, then AdamW steps ------------------------------------------------------------------


def parity(folder, dtype=torch.float32):
    """With dtype float64 the same run in double precision (weights and batch from the same files), written to
    out_f64.safetensors: a reference closer to the exact result than either f32 side, to tell which one is off."""
    params, meta = load_safetensors(folder + "/model.safetensors")
    cfg = json.loads(meta["config"])
    batch, _ = load_safetensors(folder + "/batch.safetensors")
    with open(folder + "/params.json") as f:
        run = json.load(f)
    p = {name: t.to(dtype).requires_grad_(True) for name, t in params.items()}
    opt = make_adamw(p, run)
    out, losses, grad_norms = {}, [], []
    for step in range(run["steps"]):
        opt.zero_grad()
        loss, terms, logits = loss_terms(p, cfg, batch, run)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            out["logits"] = logits.detach()
            for name, value in terms.items():
                out[name] = torch.tensor(float(value), dtype=torch.float64)
            for name, t in p.items():
                out["grad." + name] = t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)
        norm = torch.norm(torch.stack([t.grad.detach().norm() for t in p.values() if t.grad is not None]))
        grad_norms.append(norm.item())
        if run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(list(p.values()), run["grad_clip"])
        opt.step()
    out.update({name: t.detach() for name, t in p.items()})
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out["grad_norms"] = torch.tensor(grad_norms, dtype=torch.float64)
    save_safetensors(folder + ("/out.safetensors" if dtype == torch.float32 else "/out_f64.safetensors"), out)


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "parity" and sys.argv[3:] in ([], ["--f64"]):
        torch.manual_seed(0)
        parity(sys.argv[2], torch.float64 if sys.argv[3:] == ["--f64"] else torch.float32)
    else:
        sys.exit(__doc__)
