"""Benchmark: DeepLabV3+ forward and forward+backward, ours (JAX) against the PyTorch reference.

Both models hold the same randomised weights (the PyTorch reference with UniMatch's
architecture, ``zsp_jax.references.unimatch_model``, converted with our converter) and see
the same inputs. Measured, each as the minimum over ``--repeats`` runs after one warm-up:

* forward in eval mode (inference), with the relative difference of the logits printed;
* forward+backward in train mode (batch-statistics BatchNorm, as in UniMatch's training): mean
  cross-entropy over all pixels, gradients w.r.t. all parameters (torch: ``loss.backward()``);
* our compile times, and achieved FLOP/s (XLA's count of our program) against the measured
  JAX fp32 matmul rate of the machine.

Defaults are UniMatch's PASCAL setting: ResNet-101 (deep stem), 321x321, batch 4, 21 classes.

  python tools/bench_deeplab.py                      # ResNet-101
  python tools/bench_deeplab.py --backbone xception65 --num-classes 81
  python tools/bench_deeplab.py --dtype bfloat16     # ours in bf16 compute (deviation printed)
"""

from __future__ import annotations

import argparse
import time

from zsp_jax import cli


def parse_args() -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet101", choices=("resnet50", "resnet101", "xception65"))
    p.add_argument("--stem", default="deep", choices=("deep", "plain"))
    p.add_argument("--size", type=int, default=321)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--need-fp", action="store_true", help="train step with UniMatch's feature perturbation")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-backward", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from zsp_jax.runtime import set_cpu_xla_flags

    added = set_cpu_xla_flags()  # what the main job uses; ZSP_JAX_CPU_XLA_FLAGS=0 for XLA's defaults
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import nnx

    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.references.deeplab import nchw_to_nhwc, ours_from_torch, torch_reference
    from zsp_jax.utils import bench

    kw = {} if args.backbone == "xception65" else {"stem": args.stem}
    config = getattr(DeepLabConfig, args.backbone)(num_classes=args.num_classes, output_stride=args.output_stride,
                                                   **kw)
    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"DeepLabV3+ {config.variant}, {args.batch}x{args.size}x{args.size}, {config.num_classes} "
                       f"classes, output stride {config.output_stride}, ours {args.dtype}", peak)
    print(f"   CPU XLA flags added: {added or 'none'}")
    print(f"   torch {torch.__version__} with {threads} threads; torch fp32 matmul rate "
          f"{bench.torch_matmul_rate() / 1e9:.1f} GFLOP/s")

    ref = torch_reference(config, seed=0)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    model = ours_from_torch(config, ref, dtype=dtype)
    rng = np.random.default_rng(0)
    x_t = torch.from_numpy(rng.normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32))
    y_np = rng.integers(0, config.num_classes, size=(args.batch, args.size, args.size))
    y_t = torch.from_numpy(y_np)
    x, y = jnp.asarray(nchw_to_nhwc(x_t)), jnp.asarray(y_np, jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks = None
    if args.need_fp:
        masks = tuple(jnp.asarray(rng.random((args.batch, c)) < 0.5)
                      for c in (config.low_level_in, config.high_level_in))

    def compile_timed(fn, *a):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*a).compile()
        seconds = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float((cost or {}).get("flops", 0.0)) or None
        return compiled, seconds, flops

    rows = []
    # ------------------------------------------------------------------ forward, eval mode
    if not args.skip_forward:
        def forward(params, rest, x):
            return nnx.merge(graphdef, params, rest)(x, train=False)

        fwd, fwd_compile, fwd_flops = compile_timed(forward, params, rest, x)
        print(f"   compile forward: {fwd_compile:.1f} s")
        ours_s = bench.time_fn(lambda: fwd(params, rest, x), repeats=args.repeats)
        ref_s = None
        if not args.skip_torch:
            ref.eval()
            with torch.no_grad():
                ref_s = bench.time_fn(lambda: ref(x_t), repeats=args.repeats)
                expected = nchw_to_nhwc(ref(x_t))
            err = bench.relative_error(fwd(params, rest, x), expected)
            print(f"   forward logits relative error vs reference: {err:.2e}")
        rows.append(bench.Comparison("forward (eval)", ours_s, ref_s, fwd_flops, peak, args.batch, "batch"))
        print("   " + rows[-1].line())

    # ------------------------------------------------------------------ forward+backward, train mode
    def loss_fn(model, x, y):
        if masks is None:
            logits = model(x, train=True)
        else:
            logits, logits_fp = model(x, train=True, need_fp=True, fp_masks=masks)
            logits = jnp.concatenate([logits, logits_fp])
            y = jnp.concatenate([y, y])
        # one-hot form: the same mean cross-entropy, without a scatter in the backward pass
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))

    def train_step(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model, x, y)
        return loss, grads, nnx.state(model, nnx.BatchStat)

    if args.skip_backward:
        _summary(rows)
        return
    step, step_compile, step_flops = compile_timed(train_step, params, rest, x, y)
    print(f"   compile forward+backward: {step_compile:.1f} s")
    ours_s = bench.time_fn(lambda: step(params, rest, x, y), repeats=args.repeats)
    ref_s = None
    if not args.skip_torch:
        ref.train()
        m_t = None if masks is None else tuple(torch.from_numpy(np.asarray(m)) for m in masks)

        def torch_step():
            for p in ref.parameters():
                p.grad = None
            if m_t is None:
                logits = ref(x_t)
                target = y_t
            else:
                logits = torch.cat(ref(x_t, need_fp=True, fp_masks=m_t))
                target = torch.cat([y_t, y_t])
            loss = F.cross_entropy(logits, target)
            loss.backward()
            return loss.detach()

        ref_s = bench.time_fn(torch_step, repeats=args.repeats)
        loss_ours = float(step(params, rest, x, y)[0])
        print(f"   train loss ours {loss_ours:.6f}, reference {float(torch_step()):.6f}")
    rows.append(bench.Comparison("forward+backward (train)", ours_s, ref_s, step_flops, peak, args.batch, "batch"))
    print("   " + rows[-1].line())
    _summary(rows)


def _summary(rows: list) -> None:
    print("== summary")
    for r in rows:
        ratio = (f"ours/reference speed ratio x{r.reference_s / r.ours_s:.2f}" if r.reference_s
                 else "no reference run")
        print(f"   {r.name}: ours {r.ours_s:.3f} s, reference "
              f"{'-' if r.reference_s is None else f'{r.reference_s:.3f} s'}: {ratio}")


if __name__ == "__main__":
    cli.run_tool(main)
