#!/usr/bin/env python3
"""Training-step throughput of the PyTorch reference (tools/reference/model.py) on one GPU.

A step is what `difftron train` does per step: forward, cross-entropy, backward, global-norm
gradient clip (1.0) and AdamW (fused, betas 0.9/0.98, weight decay 0.05 on the matrices), on
random tokens, with float32 weights under bfloat16 autocast, torch.compile and SDPA attention.

    python3 tools/reference/bench.py --model=diff-1.3B [--batch=8 --seq=2048 --warmup=3 --steps=20]
        [--compile=regional|full|none] [--diff_impl=auto|split|wide] [--sdpa=auto|cudnn|flash|efficient]
        [--json=FILE]
    python3 tools/reference/bench.py --model=diff-1.3B --params_only      # count only (any machine)

Timing: W warm-up steps (the first compiles), then torch.cuda.synchronize(), K steps,
torch.cuda.synchronize(): tokens/s = K * batch * seq / elapsed. Peak memory is
torch.cuda.max_memory_allocated() over the timed steps (the statistics are reset after the
warm-up; weights, gradients and AdamW state stay allocated, so they are counted).

Attention: --sdpa=auto and --diff_impl=auto time one layer's attention (forward + backward,
eager) with each SDPA backend alone (cuDNN, flash, memory-efficient) and, for the Diff model,
each way of feeding the shared 2dh-wide V (model.py: "split", "wide"), and train with the
fastest pair that runs; the probe's times are printed and stored in the JSON.

--compile=regional (default) compiles each transformer block (one graph, reused by all layers)
and the head + loss: the compile takes seconds instead of a minute for the whole model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import model as M  # noqa: E402

GIB = 1024.0 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diff-1.3B", help="preset: " + ", ".join(M.PRESETS) + " (or 'custom')")
    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
        p.add_argument("--" + k, type=int, default=None, help="overrides the preset")
    p.add_argument("--attention", choices=["diff", "standard"], default=None, help="overrides the preset")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--compile", choices=["regional", "full", "none"], default="regional")
    p.add_argument("--diff_impl", choices=["auto", "split", "wide"], default="auto")
    p.add_argument("--sdpa", choices=["auto", "cudnn", "flash", "efficient", "default"], default="auto",
                   help="SDPA backend; default: torch's own choice")
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 disables the clip")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--params_only", action="store_true", help="print the parameter count (meta device) and exit")
    return p.parse_args(argv)


def make_config(a) -> M.Config:
    if a.model in M.PRESETS:
        kw = dict(M.PRESETS[a.model])
    elif a.model == "custom":
        kw = {}
    else:
        sys.exit(f"bench.py: unknown --model={a.model} (presets: {', '.join(M.PRESETS)}, or custom)")
    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "attention"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    return M.Config(vocab_size=a.vocab_size, max_seq_len=a.seq, **kw)


BACKENDS = ["cudnn", "flash", "efficient"]


def sdpa_context(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "default":
        import contextlib
        return contextlib.nullcontext()
    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([b])


def probe_attention(cfg: M.Config, B: int, S: int, backends, impls, dev):
    """Eager forward + backward of one layer's attention core (after the projections), ms."""
    att = M.Attention(cfg, 0, impls[0]).to(dev)
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, S, 2 * h, dh, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, S, 2 * hkv, dh, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, S, 2 * hkv * dh, device=dev, generator=g, dtype=torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_(True)
    gqa = hkv != h

    def core(impl):
        if not att.diff:
            o = M.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.view(B, S, 2 * hkv, dh).transpose(1, 2), gqa)
            return o
        qq, kk = q.view(B, S, h, 2, dh), k.view(B, S, hkv, 2, dh)
        vv = v.view(B, S, hkv, 2 * dh).transpose(1, 2)
        q1, q2 = qq[:, :, :, 0].transpose(1, 2), qq[:, :, :, 1].transpose(1, 2)
        k1, k2 = kk[:, :, :, 0].transpose(1, 2), kk[:, :, :, 1].transpose(1, 2)
        if impl == "wide":
            return M.sdpa(q1, k1, vv, gqa) - 0.5 * M.sdpa(q2, k2, vv, gqa)
        va, vb = vv[..., :dh], vv[..., dh:]
        o1 = torch.cat((M.sdpa(q1, k1, va, gqa), M.sdpa(q1, k1, vb, gqa)), -1)
        o2 = torch.cat((M.sdpa(q2, k2, va, gqa), M.sdpa(q2, k2, vb, gqa)), -1)
        return o1 - 0.5 * o2

    results = {}
    for impl in impls:
        for be in backends:
            key = f"{impl}/{be}" if att.diff else be
            try:
                with sdpa_context(be), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a refused backend warns why, then raises
                    for _ in range(2):
                        core(impl).float().square().mean().backward()
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    n = 5
                    e0.record()
                    for _ in range(n):
                        core(impl).float().square().mean().backward()
                    e1.record()
                    torch.cuda.synchronize()
                    results[key] = e0.elapsed_time(e1) / n
            except Exception as e:  # backend refuses these shapes
                msg = str(e).strip().splitlines()
                results[key] = "n/a: " + (msg[0][:100] if msg else type(e).__name__)
            finally:
                for t in (q, k, v):
                    t.grad = None
    return results


def main(argv=None):
    a = parse_args(argv)
    cfg = make_config(a)
    n_params = cfg.num_parameters()
    if a.params_only:
        with torch.device("meta"):
            m = M.Transformer(cfg)
        counted = sum(p.numel() for p in m.parameters())
        print(json.dumps({"model": a.model, "params": counted, "formula": n_params, "config": vars(cfg)}))
        return 0 if counted == n_params else 1

    if not torch.cuda.is_available():
        print("bench.py: SKIP: torch has no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    result = {"model": a.model, "params": n_params, "batch": a.batch, "seq": a.seq, "vocab": a.vocab_size,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev), "compile": a.compile,
              "warmup_steps": a.warmup, "timed_steps": a.steps, "config": vars(cfg)}

    # Attention path: the fastest that runs, or the one asked for.
    backends = BACKENDS if a.sdpa == "auto" else [a.sdpa]
    diff = cfg.attention == "diff"
    impls = (["split", "wide"] if a.diff_impl == "auto" else [a.diff_impl]) if diff else ["-"]
    t0 = time.perf_counter()
    probe = probe_attention(cfg, a.batch, a.seq, backends, impls, dev)
    torch.cuda.empty_cache()
    ok = {k: v for k, v in probe.items() if isinstance(v, float)}
    print(f"[{a.model}] attention probe (fwd+bwd of one layer, eager, ms): "
          + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in probe.items()),
          flush=True)
    if not ok:
        print(f"bench.py: no SDPA backend runs this attention: {probe}", file=sys.stderr)
        return 1
    best = min(ok, key=ok.get)
    impl, backend = best.split("/") if diff else ("-", best)
    result.update(attention_probe_ms=probe, diff_impl=impl, sdpa_backend=backend,
                  probe_s=round(time.perf_counter() - t0, 2))

    with torch.device(dev):
        model = M.Transformer(cfg, impl if diff else "split")
    model.init_weights(a.seed)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == n_params
    opt = torch.optim.AdamW(M.decay_groups(model, 0.05), lr=a.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)

    if a.compile == "regional":
        for blk in model.model.layers:
            blk.compile()
        head = torch.compile(M.head_loss)
        step_loss = lambda t, y: head(model, model.hidden(t), y)  # noqa: E731
    elif a.compile == "full":
        step_loss = torch.compile(lambda t, y: M.loss_fn(model, t, y))
    else:
        step_loss = lambda t, y: M.loss_fn(model, t, y)  # noqa: E731

    g = torch.Generator(device=dev).manual_seed(a.seed)
    nb = 4
    data = torch.randint(0, cfg.vocab_size, (nb, a.batch, a.seq + 1), device=dev, generator=g)
    inputs = [data[i, :, :-1].contiguous() for i in range(nb)]
    targets = [data[i, :, 1:].contiguous() for i in range(nb)]

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(inputs[i % nb], targets[i % nb])
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with sdpa_context(backend):
        warm, loss0 = [], None
        for i in range(a.warmup):
            t1 = time.perf_counter()
            loss = step(i)
            if i == 0:
                loss0 = float(loss.detach())
            torch.cuda.synchronize()
            warm.append(time.perf_counter() - t1)
            if i == 0:
                print(f"[{a.model}] first step (compile) {warm[0]:.1f} s, loss {loss0:.4f}", flush=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        t1 = time.perf_counter()
        for i in range(a.steps):
            loss = step(a.warmup + i)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t1
    last = float(loss.detach())
    if not math.isfinite(last):
        print(f"bench.py: loss is {last}", file=sys.stderr)
        return 1
    tokens = a.steps * a.batch * a.seq
    try:
        from torch._dynamo.utils import counters
        graphs = int(counters["stats"]["unique_graphs"])
    except Exception:
        graphs = -1
    result.update(tokens_per_s=tokens / elapsed, step_ms=1000 * elapsed / a.steps,
                  warmup_s=[round(w, 3) for w in warm], first_loss=loss0,
                  last_loss=last, peak_gib=torch.cuda.max_memory_allocated(dev) / GIB,
                  peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / GIB, compiled_graphs=graphs)
    print(f"[{a.model}] {result['tokens_per_s']:.0f} tok/s, {result['step_ms']:.1f} ms/step over {a.steps} steps, "
          f"peak {result['peak_gib']:.2f} GiB, attention {impl}/{backend}, graphs compiled {graphs}, "
          f"loss {last:.4f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
