"""PyTorch reference of difftron's two models (docs/MODEL.md section 1).

Decoder-only, pre-norm, Llama-style: RMSNorm, SwiGLU, rotate-half RoPE, no biases, untied LM head.

* attention="diff": the Differential Transformer (Ye et al., ICLR 2025). h differential heads,
  each owns two dh-wide query maps and (through its group g) two dh-wide key maps and one
  2dh-wide value head:
      A_j     = softmax(Q_j K_j^T / sqrt(dh) + causal mask),  j = 1, 2
      lambda  = exp(<lq1, lk1>) - exp(<lq2, lk2>) + lambda_init       (a scalar per layer)
      lambda_init = 0.8 - 0.6 exp(-0.3 l)                             (l: 0-based layer index)
      O       = RMSNorm_2dh(A_1 V - lambda A_2 V) * w_sub * (1 - lambda_init)
* attention="standard": the baseline with 2h ordinary heads of dh (2 h_kv key/value heads).

Weights use difftron's layout and names (the Llama names; docs/CHECKPOINTS.md): the rows of
q_proj for differential head i are [Q_i1 | Q_i2] (maps interleaved per head), k_proj likewise
per group, v_proj holds h_kv heads of 2dh. `load_hf_state` reads a `difftron convert --to_hf`
folder (DiffLlama's halves layout, w_sub folded into o_proj) into this layout.

Every attention map goes through torch's scaled_dot_product_attention (SDPA), so on a GPU the
fused cuDNN / flash kernels run it. The differential head's two maps share V of width 2dh;
`diff_impl` chooses how that reaches SDPA:
  "split": V is split into its two dh-wide halves and each map runs SDPA once per half (4 SDPA
           calls of head width dh). Every backend takes these (q, k and v of equal width), at
           the cost of computing each softmax twice.
  "wide":  each map runs SDPA once against the whole 2dh-wide V (2 calls, q/k width dh, v
           width 2dh): no softmax is computed twice, but only backends that accept a value
           width different from the query's run it (not flash).
bench.py picks the fastest that works on the GPU (--diff_impl=auto) and reports it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class Config:
    vocab_size: int = 32000
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 8        # h: differential heads (the baseline has 2h heads)
    n_kv_heads: int = 0     # h_kv: key/value groups; 0 = n_heads
    head_dim: int = 0       # dh: per-map head width; 0 = d_model / (2 h)
    ffn_dim: int = 0        # SwiGLU width; 0 = 8/3 d rounded up to a multiple of 128
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    lambda_std: float = 0.1
    attention: str = "diff"  # "diff" or "standard"

    def __post_init__(self):
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            self.head_dim = self.d_model // (2 * self.n_heads)
        if self.ffn_dim == 0:
            self.ffn_dim = (8 * self.d_model // 3 + 127) // 128 * 128
        if self.attention not in ("diff", "standard"):
            raise ValueError(f"attention must be 'diff' or 'standard', not {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even (RoPE)")

    @property
    def q_dim(self) -> int:
        return 2 * self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """The count difftron's ModelConfig::num_parameters gives (untied head)."""
        d, L = self.d_model, self.n_layers
        per_layer = 2 * d + d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.ffn_dim
        if self.attention == "diff":
            per_layer += 6 * self.head_dim  # lq1 lk1 lq2 lk2, and the 2dh sub-norm weight
        return L * per_layer + d + 2 * self.vocab_size * d


# The models of docs/PERFORMANCE.md's comparison (vocab 32000, seq 2048). The baseline has the
# same d, L and dh with 2h ordinary heads: 16 heads of 128 (1.3B) / 16 heads of 64 (350M).
PRESETS: Dict[str, dict] = {
    "diff-1.3B": dict(d_model=2048, n_layers=24, n_heads=8, head_dim=128, ffn_dim=5632, attention="diff"),
    "base-1.3B": dict(d_model=2048, n_layers=24, n_heads=8, head_dim=128, ffn_dim=5632, attention="standard"),
    "diff-350M": dict(d_model=1024, n_layers=24, n_heads=8, head_dim=64, ffn_dim=2816, attention="diff"),
    "base-350M": dict(d_model=1024, n_layers=24, n_heads=8, head_dim=64, ffn_dim=2816, attention="standard"),
}


def lambda_init(layer: int) -> float:
    """docs/MODEL.md: 0.8 - 0.6 exp(-0.3 l), l the 0-based layer index (0.2 for the first layer)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, scale: float | torch.Tensor = 1.0):
    """x / sqrt(mean(x^2) + eps) * weight * scale over the last dimension, in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if not (isinstance(scale, float) and scale == 1.0):
        y = y * scale
    return y.to(x.dtype) if x.dtype != torch.float32 else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_tables(seq: int, head_dim: int, theta: float, device=None):
    """cos and sin [seq, dh/2] of angle s * theta^(-2c/dh), computed in float64 like difftron's reference."""
    half = head_dim // 2
    c = torch.arange(half, dtype=torch.float64, device=device)
    inv_freq = theta ** (-2.0 * c / head_dim)
    ang = torch.arange(seq, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, S, H, dh]: (x_c, x_{c+dh/2}) rotated by the angle of (s, c)."""
    S, half = x.shape[1], x.shape[-1] // 2
    c = cos[:S, None, :]
    s = sin[:S, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def sdpa(q, k, v, gqa: bool):
    """Causal SDPA of q [B, Hq, S, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev]; scale 1/sqrt(E)."""
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int, diff_impl: str = "split"):
        super().__init__()
        self.cfg = cfg
        self.diff = cfg.attention == "diff"
        self.diff_impl = diff_impl
        d = cfg.d_model
        self.q_proj = nn.Linear(d, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, d, bias=False)
        if self.diff:
            dh = cfg.head_dim
            self.lambda_q1 = nn.Parameter(torch.zeros(dh))
            self.lambda_k1 = nn.Parameter(torch.zeros(dh))
            self.lambda_q2 = nn.Parameter(torch.zeros(dh))
            self.lambda_k2 = nn.Parameter(torch.zeros(dh))
            self.subln = RMSNorm(2 * dh, cfg.norm_eps)
            # A buffer, not a Python float: torch.compile then reuses one graph for all layers
            # (a float would be specialised per layer and recompile each one).
            self.register_buffer("lambda_init", torch.tensor(lambda_init(layer), dtype=torch.float32),
                                 persistent=False)

    def lambda_full(self) -> torch.Tensor:
        l1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        l2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init

    def forward(self, x, cos, sin):
        cfg = self.cfg
        B, S, _ = x.shape
        h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = apply_rope(self.q_proj(x).view(B, S, 2 * h, dh), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, S, 2 * hkv, dh), cos, sin)
        v = self.v_proj(x)
        gqa = hkv != h
        if not self.diff:
            o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.view(B, S, 2 * hkv, dh).transpose(1, 2), gqa)
            return self.o_proj(o.transpose(1, 2).reshape(B, S, cfg.q_dim))
        q = q.view(B, S, h, 2, dh)
        k = k.view(B, S, hkv, 2, dh)
        v = v.view(B, S, hkv, 2 * dh).transpose(1, 2)          # [B, hkv, S, 2dh]
        q1, q2 = q[:, :, :, 0].transpose(1, 2), q[:, :, :, 1].transpose(1, 2)  # [B, h, S, dh]
        k1, k2 = k[:, :, :, 0].transpose(1, 2), k[:, :, :, 1].transpose(1, 2)  # [B, hkv, S, dh]
        if self.diff_impl == "wide":
            o1 = sdpa(q1, k1, v, gqa)
            o2 = sdpa(q2, k2, v, gqa)
        elif self.diff_impl == "split":
            va, vb = v[..., :dh], v[..., dh:]
            o1 = torch.cat((sdpa(q1, k1, va, gqa), sdpa(q1, k1, vb, gqa)), dim=-1)
            o2 = torch.cat((sdpa(q2, k2, va, gqa), sdpa(q2, k2, vb, gqa)), dim=-1)
        else:
            raise ValueError(f"diff_impl must be 'split' or 'wide', not {self.diff_impl!r}")
        lam = self.lambda_full()
        o = (o1.float() - lam * o2.float()).transpose(1, 2)    # [B, S, h, 2dh]
        o = rms_norm(o, self.subln.weight, cfg.norm_eps, 1.0 - self.lambda_init)
        return self.o_proj(o.reshape(B, S, cfg.q_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # W1
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)    # W3
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # W2

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, diff_impl: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, diff_impl)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Named `model` in the Transformer so the parameter names are the Llama / difftron ones."""

    def __init__(self, cfg: Config, diff_impl: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, l, diff_impl) for l in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config, diff_impl: str = "split"):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg, diff_impl)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def set_diff_impl(self, impl: str):
        for blk in self.model.layers:
            blk.self_attn.diff_impl = impl

    def init_weights(self, seed: int = 0):
        """N(0, init_std) for matrices and embeddings, N(0, lambda_std) for the lambda vectors, ones for norms."""
        dev = self.lm_head.weight.device
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("subln.weight"):
                    p.fill_(1.0)
                elif ".lambda_" in name:
                    p.normal_(0.0, self.cfg.lambda_std, generator=g)
                else:
                    p.normal_(0.0, self.cfg.init_std, generator=g)
            cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, dev)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            for l, blk in enumerate(self.model.layers):
                if blk.self_attn.diff:
                    blk.self_attn.lambda_init.fill_(lambda_init(l))

    def hidden(self, tokens):
        x = self.model.embed_tokens(tokens)
        for blk in self.model.layers:
            x = blk(x, self.rope_cos, self.rope_sin)
        return x

    def forward(self, tokens):
        """Logits [B, S, vocab] of tokens [B, S]."""
        return self.lm_head(self.model.norm(self.hidden(tokens)))


def head_loss(model: Transformer, x, targets):
    """Mean next-token cross-entropy (float32) of the final hidden states x [B, S, d]."""
    logits = model.lm_head(model.model.norm(x))
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def loss_fn(model: Transformer, tokens, targets):
    return head_loss(model, model.hidden(tokens), targets)


def decay_groups(model: nn.Module, weight_decay: float):
    """difftron's default: weight decay on the layers' matrices only (not embeddings, head, norms, lambdas)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# Reading a `difftron convert --to_hf` folder (float32 or bfloat16 safetensors, maybe sharded).

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:e]), dtype=_ST_DTYPES[meta["dtype"]]) if e > b else \
            torch.empty(0, dtype=_ST_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).float()
    return out


def read_hf_folder(folder: str):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(folder, f)))
    return cfg, tensors


def config_from_hf(hf: dict, max_seq_len: int = 0) -> Config:
    diff = hf.get("model_type") == "diffllama"
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if hf.get("tie_word_embeddings"):
        raise ValueError("tied embeddings: this reference has an untied head")
    return Config(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=heads // 2, n_kv_heads=kv // 2, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                  ffn_dim=hf["intermediate_size"], max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
                  rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                  norm_eps=float(hf.get("rms_norm_eps", 1e-5)), attention="diff" if diff else "standard")


def _halves_to_interleaved(w: torch.Tensor, n: int, dh: int) -> torch.Tensor:
    """HF DiffLlama row block i + j n (map j of head/group i) -> difftron's block 2 i + j."""
    return w.view(2, n, dh, -1).transpose(0, 1).reshape(w.shape)


def load_hf_state(model: Transformer, tensors: Dict[str, torch.Tensor]):
    """Loads an HF (Llama / DiffLlama) state into the model; every tensor must be used."""
    cfg = model.cfg
    diff = cfg.attention == "diff"
    params = dict(model.named_parameters())
    used = set()
    with torch.no_grad():
        for name, p in params.items():
            if diff and name.endswith("subln.weight"):
                p.fill_(1.0)  # HF's group norm has no weight (w_sub is folded into o_proj)
                continue
            if name not in tensors:
                raise KeyError(f"missing tensor {name}")
            w = tensors[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(w.shape)}, expected {tuple(p.shape)}")
            if diff and name.endswith("q_proj.weight"):
                w = _halves_to_interleaved(w, cfg.n_heads, cfg.head_dim)
            elif diff and (name.endswith("k_proj.weight") or name.endswith("v_proj.weight")):
                w = _halves_to_interleaved(w, cfg.n_kv_heads, cfg.head_dim)
            p.copy_(w)
            used.add(name)
    extra = [n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise KeyError(f"tensors with no place in the model: {extra}")
