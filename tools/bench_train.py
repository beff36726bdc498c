"""Benchmark: the semi-supervised train step, ours (one jitted program) against PyTorch eager UniMatch.

Both sides hold the same randomised weights (UniMatch's DeepLabV3+ in PyTorch,
``zsp_jax.references.unimatch_model``, converted with our converter) and train on the same batch,
CutMix boxes and feature-perturbation masks; the PyTorch side is UniMatch's iteration as
``unimatch.py`` computes it (``zsp_jax.references.unimatch_step``): the eval-mode forward of the mix
images, the two train-mode forwards, the losses, ``backward()``, SGD and the poly schedule. Ours is
``zsp_jax.train.step.make_update_fn`` (the same work; the pipeline's on-device augmentation is left
out because the reference does it in its data loader). Per mode, the minimum over ``--repeats``
steps after one warm-up (ours and the reference taking turns, step by step), steps/s and images/s (labelled + unlabelled), the speed ratio, XLA's FLOP
count of our step and the achieved FLOP/s against the measured fp32 matmul rate; the first step's
loss on both sides (their relative difference).

Defaults are UniMatch's PASCAL setting per GPU: ResNet-101 (deep stem), crop 321, 2 labelled + 2
unlabelled images, 21 classes.

``--family v2``: the UniMatch V2 step, ours (``zsp_jax.train.v2_step.make_update_fn_v2``: the EMA
teacher's forward of the weak views, CutMix with the flipped batch, one student forward of
``[labelled; strong 1; strong 2]`` with complementary dropout, AdamW, the EMA update) against V2's
iteration in PyTorch eager (``zsp_jax.references.unimatch_v2_step``: ``model_ema(img_u_w)``,
``model(img_x)``, ``model(cat(s1, s2), comp_drop=True)``, ``backward()``, AdamW, the EMA of every
parameter), on the same randomised DINOv2 + DPT weights (per ``--encoders``: s = ViT-S/14, b =
ViT-B/14; the reference's encoder is transformers' ``Dinov2Model`` with DINOv2's positional
resampling, ``zsp_jax.references.dinov2``), batch, CutMix boxes and complementary-dropout mask.
Defaults are V2's PASCAL setting per GPU: crop 518, 4 labelled + 4 unlabelled images, 21 classes.
With ``--phases``, per encoder: the encoder (``get_intermediate_layers`` at V2's indices) and the DPT head (with
the final upsampling) timed apart on the student's largest forward, the 2 x batch strong views, each forward
alone and forward + backward (a fixed random cotangent; gradients of the parameters, and for the head of its
input features too), ours (one jitted program each) against the reference's modules.

  python tools/bench_train.py                           # unimatch and zsp, R101, 321, 2+2
  python tools/bench_train.py --backbone resnet50 --size 161 --modes unimatch
  python tools/bench_train.py --dtype bfloat16          # ours in bf16 compute, fp32 master weights
  python tools/bench_train.py --family v2               # unimatch_v2 and zsp, DINOv2-S and -B, 518, 4+4
  python tools/bench_train.py --family v2 --size 126 --batch 2 --encoders s   # a CPU-sized run
  python tools/bench_train.py --family v2 --size 154 --encoders s --modes unimatch_v2 --phases
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

from zsp_jax import cli


def parse_args() -> argparse.Namespace:
    from zsp_jax.utils import bench

    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="deeplab", choices=("deeplab", "v2"),
                   help="deeplab: UniMatch V1's step; v2: UniMatch V2's (DINOv2 + DPT, AdamW, EMA teacher)")
    p.add_argument("--backbone", default="resnet101", choices=("resnet50", "resnet101", "xception65"))
    p.add_argument("--encoders", default="s,b", help="v2: DINOv2 encoders, comma-separated (s, b, l, g)")
    p.add_argument("--size", type=int, default=None, help="crop size (default 321; v2: 518, a multiple of 14)")
    p.add_argument("--batch", type=int, default=None,
                   help="labelled (= unlabelled) images per step (default 2; v2: 4, V2's per GPU)")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--modes", default=None, help="default unimatch,zsp (v2: unimatch_v2,zsp)")
    p.add_argument("--conf-thresh", type=float, default=0.95)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--phases", action="store_true",
                   help="deeplab: also time the forward apart from backward + optimiser (ours: one more program); "
                        "v2: also time the encoder and the DPT head apart, forward and forward + backward")
    bench.add_precision_flag(p)
    args = p.parse_args()
    v2 = args.family == "v2"
    args.size = args.size or (518 if v2 else 321)
    args.batch = args.batch or (4 if v2 else 2)
    args.modes = args.modes or ("unimatch_v2,zsp" if v2 else "unimatch,zsp")
    if v2 and args.size % 14:
        p.error(f"--size={args.size}: DINOv2 needs a multiple of 14")
    if v2 and args.backbone != "resnet101":
        p.error(f"--backbone={args.backbone}: a V1 option; --family v2 takes --encoders")
    return args


def main() -> None:
    args = parse_args()
    from zsp_jax.runtime import set_cpu_xla_flags

    added = set_cpu_xla_flags()  # what the main job uses; ZSP_JAX_CPU_XLA_FLAGS=0 for XLA's defaults
    if args.family == "v2":
        main_v2(args, added)
        return
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch

    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.references import unimatch_step
    from zsp_jax.references.deeplab import ours_from_torch, random_fp_masks, torch_reference
    from zsp_jax.train import state as state_lib
    from zsp_jax.train import step as step_lib
    from zsp_jax.utils import bench

    precision_line = bench.set_matmul_precision(args.matmul_precision)
    kw = {} if args.backbone == "xception65" else {"stem": "deep"}
    config = getattr(DeepLabConfig, args.backbone)(num_classes=args.num_classes, **kw)
    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"UniMatch train step, DeepLabV3+ {config.variant}, {args.batch}+{args.batch} images of "
                       f"{args.size}x{args.size}, {config.num_classes} classes, ours {args.dtype}", peak)
    print(precision_line)
    print(f"   CPU XLA flags added: {added or 'none'}")
    print(f"   torch {torch.__version__} with {threads} threads; torch fp32 matmul rate "
          f"{bench.torch_matmul_rate() / 1e9:.1f} GFLOP/s")

    lr, lr_multi, total = 1e-3, 10.0, 1000
    opt_config = ml_collections.ConfigDict({"train": {"lr": lr, "head_lr_multiplier": lr_multi, "momentum": 0.9,
                                                      "weight_decay": 1e-4, "lr_power": 0.9}})
    ref0 = torch_reference(config, seed=0)
    raw = unimatch_step.random_batch(args.batch, args.size, config.num_classes, seed=0)
    fp_masks = random_fp_masks(config, 2 * args.batch, seed=1, dtype=np.float32)
    batch = jax.tree.map(jnp.asarray, unimatch_step.our_batch(raw, np.float32, fp_masks))
    tb = unimatch_step.torch_batch(raw, torch.float32)
    tm = tuple(torch.from_numpy(m) for m in fp_masks)
    images = 2 * args.batch
    rows = []
    for mode in args.modes.split(","):
        options = step_lib.StepOptions(mode=mode, conf_thresh=args.conf_thresh)
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
        ours = state_lib.strip_rng_streams(ours_from_torch(config, ref0, dtype=dtype))
        graphdef, params, stats = state_lib.split_model(ours)
        tx, schedule = state_lib.make_optimizer(opt_config, params, total)
        state = state_lib.init_state(params, stats, tx)
        key = jax.random.key(0)
        update = jax.jit(step_lib.make_update_fn(graphdef, tx, options, schedule), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = update.lower(state, batch, key).compile()
        compile_s = time.perf_counter() - t0
        flops = bench.program_flops(compiled)
        holder = [state]

        def ours_step():
            holder[0], m = compiled(holder[0], batch, key)
            return m

        first = jax.tree.map(float, ours_step())  # also the warm-up
        print(f"-- {mode}: compiled in {compile_s:.1f} s ({bench.memory_summary(compiled)}); first-step loss ours {first['loss']:.6f}", end="")
        ref_s = None
        if args.skip_torch:
            ours_s = bench.time_fn(ours_step, warmup=0, repeats=args.repeats)
        else:
            ref = copy.deepcopy(ref0)
            opt = unimatch_step.make_optimizer(ref, lr, lr_multi)
            count = [0]

            def torch_step(timings=None):
                out = unimatch_step.step(ref, opt, tb, fp_masks=tm, conf_thresh=args.conf_thresh, mode=mode,
                                         timings=timings)
                unimatch_step.set_poly_lr(opt, lr, lr_multi, count[0], total)
                count[0] += 1
                return out["loss"].detach()

            ref_first = float(torch_step())  # also the warm-up
            # Alternating steps: this VM's speed drifts by ~10% over minutes, which two blocks of steps
            # would put into the ratio.
            ours_s, ref_s = bench.time_alternating([ours_step, torch_step], repeats=args.repeats)
            print(f", reference {ref_first:.6f} (relative difference "
                  f"{abs(first['loss'] - ref_first) / abs(ref_first):.1e})", end="")
        print()
        rows.append(bench.Comparison(f"{mode} step", ours_s, ref_s, flops, peak, 1, "step"))
        print(f"   {rows[-1].line()}; {images / ours_s:.2f} images/s"
              + (f" (reference {images / ref_s:.2f})" if ref_s else ""))
        if args.phases:
            print(f"   where the time goes: {phases(graphdef, tx, options, holder, batch, key, ours_step, args.repeats, None if args.skip_torch else torch_step)}")
    print("== summary")
    for r in rows:
        ratio = f"x{r.reference_s / r.ours_s:.2f}" if r.reference_s else "-"
        print(f"   {r.name}: ours {r.ours_s:.3f} s, reference "
              f"{'-' if r.reference_s is None else f'{r.reference_s:.3f} s'}: ours/reference speed ratio {ratio}")


def v2_pair(encoder: str, num_classes: int, dtype, seed: int = 0):
    """(PyTorch reference ``DPT`` on a randomised DINOv2 of ``encoder``, our converted (graphdef, params)), the same
    weights."""
    from zsp_jax.models.dpt import DptConfig
    from zsp_jax.models.dpt import convert as dpt_convert
    from zsp_jax.references import dinov2 as dinov2_ref
    from zsp_jax.references import unimatch_v2_model
    from zsp_jax.references.torch_utils import randomize_
    from zsp_jax.train import state as state_lib
    from zsp_jax.train.v2_state import ENCODER_SIZES

    size = ENCODER_SIZES[encoder]
    config = DptConfig.for_encoder(size, num_classes)
    backbone = dinov2_ref.Dinov2Backbone(dinov2_ref.hf_model(config.encoder, seed=seed))
    ref = unimatch_v2_model.build(backbone, size, num_classes)
    randomize_(ref.head, seed + 1)
    sd = {f"backbone.{k}": v for k, v in dinov2_ref.official_state_dict(ref.backbone.model).items()}
    sd.update({f"head.{k}": v.detach().clone() for k, v in ref.head.state_dict().items()})
    converted = dpt_convert.convert_segmenter_state_dict(sd, config, source_name=f"random DINOv2-{encoder.upper()}")
    graphdef, params, _ = state_lib.split_model(converted.build(dtype=dtype))
    return config, ref, graphdef, params


def main_v2(args: argparse.Namespace, added: str) -> None:
    """The UniMatch V2 step (see the module docstring), per encoder and mode."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from zsp_jax.references import unimatch_v2_step
    from zsp_jax.train import v2_state, v2_step
    from zsp_jax.utils import bench

    precision_line = bench.set_matmul_precision(args.matmul_precision)
    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"UniMatch V2 train step, DINOv2 {args.encoders} + DPT, {args.batch}+{args.batch} images of "
                       f"{args.size}x{args.size}, {args.num_classes} classes, ours {args.dtype}", peak)
    print(precision_line)
    print(f"   CPU XLA flags added: {added or 'none'}")
    print(f"   torch {torch.__version__} with {threads} threads; torch fp32 matmul rate "
          f"{bench.torch_matmul_rate() / 1e9:.1f} GFLOP/s")
    lr, lr_multi, total = 5e-6, 40.0, 1000  # V2's rates
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    raw = unimatch_v2_step.random_batch(args.batch, args.size, args.num_classes, seed=0)
    tb = unimatch_v2_step.torch_batch(raw, torch.float32)
    images = 2 * args.batch
    rows = []
    for encoder in args.encoders.split(","):
        config, ref0, graphdef, params = v2_pair(encoder, args.num_classes, dtype)
        mask = np.asarray(v2_step.comp_drop_masks(jax.random.key(1), args.batch, config.embed_dim))
        batch = jax.tree.map(jnp.asarray, unimatch_v2_step.our_batch(raw, np.float32, mask))
        torch_mask = torch.from_numpy(mask.copy())  # np.asarray of a jax array is read-only; torch wants writable
        for mode in args.modes.split(","):
            options = v2_step.StepOptionsV2(mode=mode, conf_thresh=args.conf_thresh)
            tx, schedule = v2_state.make_optimizer_v2(v2_state.OptimizerSettingsV2(lr=lr, lr_multi=lr_multi), params,
                                                      total)
            holder = [v2_state.init_state_v2(jax.tree.map(jnp.copy, params), tx)]
            key = jax.random.key(0)
            update = jax.jit(v2_step.make_update_fn_v2(graphdef, tx, options, schedule), donate_argnums=(0,))
            t0 = time.perf_counter()
            compiled = update.lower(holder[0], batch, key).compile()
            compile_s = time.perf_counter() - t0
            flops = bench.program_flops(compiled)

            def ours_step():
                holder[0], m = compiled(holder[0], batch, key)
                return m

            first = jax.tree.map(float, ours_step())  # also the warm-up
            name = f"DINOv2-{encoder.upper()} {mode} step"
            print(f"-- {name}: compiled in {compile_s:.1f} s ({bench.memory_summary(compiled)}); first-step loss "
                  f"ours {first['loss']:.6f}", end="")
            ref_s = None
            if args.skip_torch:
                ours_s = bench.time_fn(ours_step, warmup=0, repeats=args.repeats)
            else:
                ref = copy.deepcopy(ref0)
                ref_ema = unimatch_v2_step.make_ema(ref)
                opt = unimatch_v2_step.make_optimizer(ref, lr, lr_multi)
                count = [0]

                def torch_step():
                    out = unimatch_v2_step.step(ref, ref_ema, opt, tb, iters=count[0], total_iters=total, base_lr=lr,
                                                lr_multi=lr_multi, comp_drop_mask=torch_mask,
                                                conf_thresh=args.conf_thresh, mode=mode)
                    count[0] += 1
                    return out["loss"]

                ref_first = float(torch_step())  # also the warm-up
                ours_s, ref_s = bench.time_alternating([ours_step, torch_step], repeats=args.repeats)
                print(f", reference {ref_first:.6f} (relative difference "
                      f"{abs(first['loss'] - ref_first) / abs(ref_first):.1e})", end="")
            print()
            rows.append(bench.Comparison(name, ours_s, ref_s, flops, peak, 1, "step"))
            print(f"   {rows[-1].line()}; {images / ours_s:.2f} images/s"
                  + (f" (reference {images / ref_s:.2f})" if ref_s else ""))
            # free this mode's state, program and reference before the next (both encoders' in memory at once
            # would not fit a 24 GiB machine with DINOv2-B)
            holder[0] = compiled = update = ref = ref_ema = opt = None
            gc.collect()
        if args.phases:
            for line in phases_v2(config, ref0, graphdef, params, raw, args.repeats, args.skip_torch):
                print(f"   DINOv2-{encoder.upper()} {line}")
        ref0 = params = None
        gc.collect()
    print("== summary")
    for r in rows:
        ratio = f"x{r.reference_s / r.ours_s:.2f}" if r.reference_s else "-"
        print(f"   {r.name}: ours {r.ours_s:.3f} s, reference "
              f"{'-' if r.reference_s is None else f'{r.reference_s:.3f} s'}: ours/reference speed ratio {ratio}")


def phases(graphdef, tx, options, holder, batch, key, ours_step, repeats, torch_step) -> str:
    """Forward seconds (every forward pass and the losses) and backward + optimiser seconds, ours against
    the reference.

    Ours: the loss alone compiled as one more program, and the rest of the whole step (``ours_step``, on the
    state in ``holder[0]``); the reference: its own step timed at ``loss.backward()`` and ``optimizer.step()``.
    All take turns in each of ``repeats`` rounds (the machine's drift hits them alike); each phase is its
    fastest. Our backward and optimiser are not split inside the step (a value-and-gradient program alone
    also writes the gradients out, which the step does not, so "step minus gradient program" misstates the
    optimiser); the optimiser ``tx`` is timed alone instead, on copies of the parameters and momentum
    donated as in the step, with parameter-shaped gradients.
    """
    import jax
    import optax

    from zsp_jax.train import step as step_lib
    from zsp_jax.utils import bench

    loss_fn = step_lib.make_loss_fn(graphdef, options)

    def args():  # the current state: the step donates the previous one
        return holder[0].params, holder[0].batch_stats, batch, key

    fwd = jax.jit(loss_fn).lower(*args()).compile()
    bench.block(fwd(*args()))
    ref: dict[str, float] = {}

    def reference_step():
        t: dict[str, float] = {}
        torch_step(t)
        ref.update({k: min(v, ref.get(k, float("inf"))) for k, v in t.items()})

    def sgd(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    sgd = jax.jit(sgd, donate_argnums=(0, 1))
    opt_holder = list(jax.tree.map(jax.numpy.copy, (holder[0].params, holder[0].opt_state)))
    grads = jax.tree.map(lambda p: p * 1e-3, holder[0].params)

    def optimizer_alone():
        opt_holder[:] = sgd(*opt_holder, grads)
        return opt_holder

    bench.block(optimizer_alone())
    fns = [lambda: fwd(*args()), ours_step, optimizer_alone] + ([reference_step] if torch_step else [])
    fwd_s, step_s, opt_s = bench.time_alternating(fns, repeats=repeats)[:3]
    line = f"forward ours {fwd_s:.2f} s; backward + optimizer ours {step_s - fwd_s:.2f} s"
    if ref:
        rest = ref["backward"] + ref["optimizer"]
        line = (f"forward ours {fwd_s:.2f} s, reference {ref['forward']:.2f} s (x{ref['forward'] / fwd_s:.2f}); "
                f"backward + optimizer ours {step_s - fwd_s:.2f} s, reference {rest:.2f} s "
                f"(x{rest / (step_s - fwd_s):.2f}; its optimizer.step() alone {ref['optimizer'] * 1e3:.0f} ms)")
    return line + f"; our optimiser update alone {opt_s * 1e3:.0f} ms"


def phases_v2(config, ref, graphdef, params, raw, repeats, skip_torch) -> list[str]:
    """Where V2's time goes: the encoder and the DPT head apart, forward alone and forward + backward, ours against
    the reference's modules, on the strong views ``[s1; s2]`` of ``raw`` (the student's largest forward).

    Each part is one jitted program of ours (the backward: ``jax.grad`` of the outputs' dot product with a fixed
    random cotangent, so no gradient is trivially zero) and the same computation in PyTorch eager
    (``backward()`` of the same product). All take turns in each of ``repeats`` rounds; each is its fastest.
    Returns one line per part.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import nnx

    from zsp_jax.utils import bench
    from zsp_jax.utils.resize import resize_bilinear_align_corners

    images = np.concatenate([raw["img_u_s1"], raw["img_u_s2"]]).astype(np.float32)  # (2B, S, S, 3)
    size, patch = images.shape[1], config.encoder.patch_size
    grid = (size // patch, size // patch)
    indices = tuple(config.intermediate_indices)
    model = nnx.merge(graphdef, params)
    encoder_def, encoder_params = nnx.split(model.backbone, nnx.Param)
    head_def, head_params = nnx.split(model.head, nnx.Param)
    x = jnp.asarray(images)

    def encoder(p, x):
        return list(nnx.merge(encoder_def, p).intermediate_layers(x, indices))

    def head(p, features):
        return resize_bilinear_align_corners(nnx.merge(head_def, p)(features, grid), (size, size))

    features = jax.jit(encoder)(encoder_params, x)
    rng = np.random.default_rng(0)
    feature_cots = [rng.standard_normal(f.shape, dtype=np.float32) for f in features]
    logits_cot = rng.standard_normal((*images.shape[:3], config.head.num_classes), dtype=np.float32)

    def encoder_loss(p, x):
        return sum(jnp.sum(f * c) for f, c in zip(encoder(p, x), feature_cots, strict=True))

    def head_loss(p, features):
        return jnp.sum(head(p, features) * logits_cot)

    parts = {"encoder forward": (encoder, (encoder_params, x)),
             "encoder forward + backward": (jax.grad(encoder_loss), (encoder_params, x)),
             "head forward": (head, (head_params, features)),
             "head forward + backward": (jax.grad(head_loss, argnums=(0, 1)), (head_params, features))}
    compiled = {name: jax.jit(fn).lower(*a).compile() for name, (fn, a) in parts.items()}
    ours = {name: (lambda name=name: compiled[name](*parts[name][1])) for name in parts}

    xt = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    features_t = [torch.from_numpy(np.array(f)) for f in features]  # a writable copy
    feature_cots_t = [torch.from_numpy(c) for c in feature_cots]
    logits_cot_t = torch.from_numpy(logits_cot.transpose(0, 3, 1, 2).copy())
    ref_indices = ref.intermediate_layer_idx[ref.encoder_size]

    def ref_head(fs):
        return F.interpolate(ref.head(fs, *grid), (size, size), mode="bilinear", align_corners=True)

    def ref_encoder_forward():
        with torch.no_grad():
            return ref.backbone.get_intermediate_layers(xt, ref_indices)

    def ref_encoder_backward():
        ref.zero_grad(set_to_none=True)
        out = ref.backbone.get_intermediate_layers(xt, ref_indices)
        sum((o * c).sum() for o, c in zip(out, feature_cots_t, strict=True)).backward()

    def ref_head_forward():
        with torch.no_grad():
            return ref_head(features_t)

    def ref_head_backward():
        ref.zero_grad(set_to_none=True)
        fs = [f.clone().requires_grad_(True) for f in features_t]
        (ref_head(fs) * logits_cot_t).sum().backward()

    refs = dict(zip(parts, (ref_encoder_forward, ref_encoder_backward, ref_head_forward, ref_head_backward),
                    strict=True))
    fns = list(ours.values()) + ([] if skip_torch else list(refs.values()))
    for fn in fns:  # warm-up
        bench.block(fn())
    times = bench.time_alternating(fns, repeats=repeats)
    lines = []
    for i, name in enumerate(parts):
        flops = bench.program_flops(compiled[name])
        line = f"{name}: ours {times[i]:.3f} s ({(flops or 0) / times[i] / 1e9:.1f} GFLOP/s)"
        if not skip_torch:
            reference_s = times[len(parts) + i]
            line += f", reference {reference_s:.3f} s, ours / reference speed x{reference_s / times[i]:.2f}"
        lines.append(line)
    return lines


if __name__ == "__main__":
    cli.run_tool(main)
