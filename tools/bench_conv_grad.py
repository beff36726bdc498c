"""Benchmark: the gradients of DeepLabV3+'s dense 3x3 convolutions, ours (XLA) against PyTorch's (oneDNN on CPU).

The train step's gap to PyTorch on CPU sits in the convolutions' backward (docs/benchmarks.md "Train step and what
limits it on CPU"). This tool times, per conv of the R101 train step (batch 4 at 321x321, output stride 16),
on the same random input, kernel and output gradient:

* the kernel gradient dL/dW: ours is ``jax.vjp`` of our ``Conv2d`` layer (the formulation the model
  uses for that shape), the reference ``torch.nn.grad.conv2d_weight``; the input gradient dL/dx likewise
  (``conv2d_input``);
* two other exact formulations of the kernel gradient, to show whether rewriting it helps:
  ``taps`` (one matmul per tap over the zero-padded input flattened to rows, so that each tap reads a
  contiguous slice) and ``im2col`` (the nine taps concatenated along channels, one matmul).

Each figure is the minimum over ``--repeats`` rounds in which ours and the reference take turns; the
relative difference of each gradient from torch's is printed.

  python tools/bench_conv_grad.py                  # the R101 shapes
  python tools/bench_conv_grad.py --batch 8        # the decoder's batch in the feature-perturbation stream
"""

from __future__ import annotations

import argparse

from zsp_jax import cli

# (name, in channels, out channels, spatial size, dilation) of the dense 3x3 convs of UniMatch's
# DeepLabV3+ R101 at 321x321 (deep stem; ASPP at output stride 16; decoder at stride 4).
SHAPES = (
    ("stem conv2 64->64", 64, 64, 161, 1),
    ("stem conv3 64->128", 64, 128, 161, 1),
    ("layer1 3x3 64->64", 64, 64, 81, 1),
    ("aspp rate 6 2048->256", 2048, 256, 21, 6),
    ("decoder fuse 304->256", 304, 256, 81, 1),
    ("decoder fuse 256->256", 256, 256, 81, 1),
)


def parse_args() -> argparse.Namespace:
    from zsp_jax.utils import bench

    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of the conv names to run")
    bench.add_precision_flag(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from zsp_jax.runtime import set_cpu_xla_flags

    added = set_cpu_xla_flags()  # what the main job uses; ZSP_JAX_CPU_XLA_FLAGS=0 for XLA's defaults
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from zsp_jax.models.deeplab.layers import Conv2d
    from zsp_jax.utils import bench

    precision_line = bench.set_matmul_precision(args.matmul_precision)
    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"dense 3x3 conv gradients, batch {args.batch}", peak)
    print(precision_line)
    print(f"   CPU XLA flags added: {added or '(none)'}; torch threads: {threads}")

    def flat_rows(x, dy, d):
        """The padded input and dy (2d zero columns added) flattened to rows, so that tap (ky, kx) of the
        kernel gradient pairs dy with the contiguous slice of the input starting at its offset."""
        b, h, w, c = x.shape
        wp = w + 2 * d
        xp = jnp.pad(x, ((0, 0), (d, d + 1), (d, d), (0, 0))).reshape(b, -1, c)
        dyf = jnp.pad(dy, ((0, 0), (0, 0), (0, 2 * d), (0, 0))).reshape(b, h * wp, -1)
        return [xp[:, o:o + h * wp] for o in (ky * d * wp + kx * d for ky in range(3) for kx in range(3))], dyf

    def taps_kernel_grad(x, dy, d):
        slices, dyf = flat_rows(x, dy, d)
        return jnp.stack([jnp.einsum("blc,blo->co", s, dyf) for s in slices])

    def im2col_kernel_grad(x, dy, d):
        slices, dyf = flat_rows(x, dy, d)
        return jnp.einsum("blk,blo->ko", jnp.concatenate(slices, -1), dyf)

    rng = np.random.default_rng(0)
    wanted = [s for s in args.only.split(",") if s]
    for name, cin, cout, size, d in SHAPES:
        if wanted and not any(s in name for s in wanted):
            continue
        x = rng.standard_normal((args.batch, size, size, cin), np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * (2 / (9 * cin)) ** 0.5).astype(np.float32)
        dy = rng.standard_normal((args.batch, size, size, cout), np.float32)

        def _with_kernel(x, kernel, cin=cin, cout=cout, d=d):
            layer = Conv2d(cin, cout, 3, dilation=d, rngs=nnx.Rngs(0))  # inside the trace; its init is unused
            layer.kernel.set_value(kernel)
            return layer(x)

        kernel_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: _with_kernel(x, k), k)[1](g)[0])
        input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: _with_kernel(x, k), x)[1](g)[0])
        taps = jax.jit(lambda x, g: taps_kernel_grad(x, g, d).reshape(3, 3, cin, cout))
        im2col = jax.jit(lambda x, g: im2col_kernel_grad(x, g, d).reshape(3, 3, cin, cout))
        xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)

        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        gt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous()
        ref_kernel = lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=d, dilation=d)  # noqa: E731
        ref_input = lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, padding=d, dilation=d)  # noqa: E731

        fns = [lambda: kernel_grad(xj, wj, gj), ref_kernel, lambda: input_grad(xj, wj, gj), ref_input,
               lambda: taps(xj, gj), lambda: im2col(xj, gj)]
        outs = [bench.block(f()) for f in fns]  # warm-up (compiles) and the values compared
        t = bench.time_alternating(fns, repeats=args.repeats)
        dw_ref = outs[1].permute(2, 3, 1, 0).numpy()
        dx_ref = outs[3].permute(0, 2, 3, 1).numpy()
        flops = 2 * 9 * args.batch * size * size * cin * cout  # the dense count (padding taps included)
        print(f"-- {name} @ {size}x{size}, dilation {d}: {flops / 1e9:.1f} GFLOP per gradient")
        print("   " + bench.Comparison("kernel grad", t[0], t[1], flops, peak).line()
              + f" | rel diff {bench.relative_error(outs[0], dw_ref):.1e}")
        print("   " + bench.Comparison("input grad ", t[2], t[3], flops, peak).line()
              + f" | rel diff {bench.relative_error(outs[2], dx_ref):.1e}")
        print(f"   kernel grad rewritten: taps {t[4] * 1e3:.1f} ms (rel diff {bench.relative_error(outs[4], dw_ref):.1e}),"
              f" im2col {t[5] * 1e3:.1f} ms (rel diff {bench.relative_error(outs[5], dw_ref):.1e})")


if __name__ == "__main__":
    cli.run_tool(main)
