#!/usr/bin/env python
"""Speed of the dense heads (segmentation and pose), and interlaced sparse against full self-attention.

1. For each backbone (default: resnet18 at output stride 8, hrformer_t) the backbone's forward
   and forward+backward on a --size x --size input are timed (--backbone-repeats, default 1), then every head on the
   backbone's real feature maps: forward (eval, inference mode, logits upsampled to the input) and
   forward+backward (train mode, cross-entropy at input resolution + aux_weight x aux CE, as in
   source training). A whole model costs backbone + head: both columns are printed.
2. The pose heads (deconv, heatmap) on --pose-backbones (default resnet18 at its classification
   strides, hrformer_t) as whole models on 256 x 192 person crops: forward and forward+backward.
3. The ISSA head against the same head with one full (non-interlaced) self-attention block of the
   same widths (`create_head("issa", ..., attention="full")`), on resnet18-OS-8-shaped features of
   the same input: forward+backward time and peak memory of the attention block alone and of the
   whole head. Each memory figure comes from a fresh subprocess: on CUDA
   torch.cuda.max_memory_allocated minus the memory allocated before the pass; on the CPU the
   growth of the process's peak resident set over one forward+backward (Linux VmHWM, reset to the
   current set just before the pass, after the module and its input exist and before anything has
   run): it counts every buffer the pass holds at its peak (activations, attention maps,
   gradients), which tracemalloc cannot see.

Widths are the papers' (512-channel heads, key 256) unless --channels says otherwise. The last
line is `dense_issa_vs_full_memory_ratio=<x>` (attention block alone, ISSA / full). Times are the
fastest of --repeats calls. On a CPU whose cores are busy with other jobs, pass --threads 1: two
OpenMP threads on two oversubscribed cores ran the hrformer_t forward 15x slower here (28 s vs
1.9 s at 512x512 under a load average of 4.6 on 2 cores).

    python scripts/bench_dense.py                       # defaults: 512x512, batch 1, all heads
    python scripts/bench_dense.py --size 256 --channels 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workbench.heads import create_head, list_heads  # noqa: E402
from adaptation.dense.model import PoseModel, backbone_kwargs_for  # noqa: E402
from workbench.backbones import create_backbone  # noqa: E402

NUM_CLASSES = 19  # Cityscapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """The fastest of `repeats` timed calls after `warmup` untimed ones: on a machine shared with
    other jobs the minimum is the least disturbed figure (as timeit advises)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def head_kwargs(args) -> dict:
    return {"channels": args.channels} if args.channels else {}


def training_loss(logits, aux, aux_weight, size, labels):
    loss = F.cross_entropy(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), labels)
    if aux is not None:
        aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        loss = loss + aux_weight * F.cross_entropy(aux, labels)
    return loss


def bench_backbone(name: str, args, device: torch.device) -> None:
    net = create_backbone(name, **backbone_kwargs_for("segmentation", name)).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    start = time.perf_counter()
    with torch.no_grad():   # not inference mode: the heads' backward must be able to save these
        feats = net.forward_features(x)   # also the forward's warm-up
    sync(device)
    first = time.perf_counter() - start

    def forward():
        with torch.inference_mode():
            net.forward_features(x)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        sum(f.float().mean() for f in net.forward_features(x)).backward()

    fwd = seconds(forward, args.backbone_repeats, device, warmup=0)
    train = seconds(forward_backward, args.backbone_repeats, device, warmup=0)
    shapes = ", ".join(f"{f.shape[1]}@{f.shape[2]}x{f.shape[3]}" for f in feats)
    print(f"\n{name} {backbone_kwargs_for('segmentation', name) or ''} maps {shapes}")
    print(f"  backbone alone: forward {fwd * 1e3:9.0f} ms (first call {first * 1e3:.0f}), "
          f"forward+backward {train * 1e3:9.0f} ms")
    print(f"  {'head':8s} {'params':>8s} {'inputs':>14s} {'D':>5s} {'head fwd ms':>12s} {'head f+b ms':>12s} "
          f"{'model fwd ms':>13s} {'model f+b ms':>13s}")
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), device=device)
    for head_name in args.heads:
        head = create_head(head_name, net.feature_info, NUM_CLASSES, **head_kwargs(args)).to(device)

        def head_forward():
            with torch.inference_mode():
                logits, _ = head(feats, with_aux=False)
                F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

        def head_forward_backward():
            head.zero_grad(set_to_none=True)
            logits, aux = head(feats)
            training_loss(logits, aux, head.aux_weight, x.shape[-2:], labels).backward()

        head.eval()
        h_fwd = seconds(head_forward, args.repeats, device)
        head.train()
        h_train = seconds(head_forward_backward, args.repeats, device)
        params = sum(p.numel() for p in head.parameters()) / 1e6
        inputs = f"{head.inputs.mode}@{head.inputs.reduction}"
        print(f"  {head_name:8s} {params:7.2f}M {inputs:>14s} {head.feature_dim:5d} {h_fwd * 1e3:12.0f} "
              f"{h_train * 1e3:12.0f} {(fwd + h_fwd) * 1e3:13.0f} {(train + h_train) * 1e3:13.0f}", flush=True)


# ------------------------------------------------------------------ pose heads

POSE_INPUT = (256, 192)   # height, width: the COCO top-down setting
POSE_JOINTS = 17


def bench_pose(args, device: torch.device) -> None:
    """Whole pose models (backbone at its classification strides + keypoint head) on 256 x 192 crops:
    forward (eval, inference mode) and forward+backward (train, JointsMSE against random targets)."""
    print(f"\npose heads, input {args.batch}x3x{POSE_INPUT[0]}x{POSE_INPUT[1]}, {POSE_JOINTS} joints "
          f"(head width: published, 256 for deconv)")
    print(f"  {'model':26s} {'params':>8s} {'heatmaps':>10s} {'fwd ms':>9s} {'f+b ms':>9s}")
    x = torch.randn(args.batch, 3, *POSE_INPUT, device=device)
    for backbone in args.pose_backbones:
        for head in list_heads("pose"):
            model = PoseModel(backbone, head, POSE_JOINTS).to(device)
            with torch.no_grad():
                out = model.eval()(x)
            target = torch.rand_like(out)

            def forward():
                with torch.inference_mode():
                    model(x)

            def forward_backward():
                model.zero_grad(set_to_none=True)
                ((model(x) - target) ** 2).mean().backward()

            model.eval()
            fwd = seconds(forward, args.repeats, device)
            model.train()
            train = seconds(forward_backward, args.repeats, device)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"  {backbone + '+' + head:26s} {params:7.2f}M {out.shape[2]:>4d}x{out.shape[3]:<5d} "
                  f"{fwd * 1e3:9.0f} {train * 1e3:9.0f}", flush=True)


# ------------------------------------------------------------------ ISSA against full attention

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) to the current one (Linux >= 4.0: clear_refs 5).
    getrusage's ru_maxrss cannot be reset, and a child started by fork+exec inherits the
    parent's peak in it, hence VmHWM."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, StopIteration):
        return 0


def resnet_feature_shapes(size: int, batch: int) -> tuple[list[dict], list[tuple[int, ...]]]:
    with torch.device("meta"):   # only its description: allocating (and freeing) its weights would
        # leave freed memory for the measured pass to reuse, hiding part of its peak
        info = create_backbone("resnet18", **backbone_kwargs_for("segmentation", "resnet18")).feature_info
    return info, [(batch, f["channels"], math.ceil(size / f["reduction"]), math.ceil(size / f["reduction"]))
                  for f in info]


def attention_child(attention: str, part: str, args, device: torch.device) -> dict:
    """One forward+backward of the ISSA head (or its full-attention twin), or of its attention block."""
    torch.manual_seed(0)
    info, shapes = resnet_feature_shapes(args.size, args.batch)
    head = create_head("issa", info, NUM_CLASSES, attention=attention, **head_kwargs(args)).to(device).train()
    feats = [torch.randn(s, device=device) for s in shapes]
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), device=device)
    if part == "block":
        module = head.context
        x = torch.randn(args.batch, head.classifier.in_channels, *shapes[-1][2:], device=device)

        def step():
            module.zero_grad(set_to_none=True)
            module(x).square().mean().backward()
    else:
        def step():
            head.zero_grad(set_to_none=True)
            logits, aux = head(feats)
            training_loss(logits, aux, head.aux_weight, (args.size, args.size), labels).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        hidden = 0
    else:
        # growth of the peak resident set over the current one; `hidden` is how far the peak still
        # stands above the current set after the reset (it should be ~0, else the figure is a floor)
        reset_peak_rss()
        before = resident_bytes()
        hidden = peak_bytes(device) - before
    step()
    sync(device)
    peak = peak_bytes(device) - before
    return {"attention": attention, "part": part, "peak_mib": peak / 2**20, "hidden_mib": hidden / 2**20,
            "seconds": seconds(step, args.repeats, device, warmup=0), "map": list(shapes[-1][2:])}


def run_child(args, attention: str, part: str) -> dict:
    cmd = [sys.executable, __file__, "--child", attention, part, "--size", str(args.size), "--batch",
           str(args.batch), "--repeats", str(args.repeats), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.channels:
        cmd += ["--channels", str(args.channels)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {attention}/{part} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="input side (default 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls per head measurement, after one warm-up; the fastest is reported")
    p.add_argument("--backbone-repeats", type=int, default=1,
                   help="timed backbone calls (the feature computation is the forward's warm-up)")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "hrformer_t"])
    p.add_argument("--heads", nargs="+", default=None,
                   help=f"default: all segmentation heads ({', '.join(list_heads('segmentation'))})")
    p.add_argument("--channels", type=int, default=None, help="head width (default: the papers' 512)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-heads", action="store_true", help="only the ISSA vs full attention comparison")
    p.add_argument("--pose-backbones", nargs="+", default=["resnet18", "hrformer_t"],
                   help="backbones for the pose heads at 256x192 (none: skip)")
    p.add_argument("--skip-pose", action="store_true", help="leave out the pose heads")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.heads = args.heads or list_heads("segmentation")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(attention_child(*args.child, args, device)))
        return
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"input {args.batch}x3x{args.size}x{args.size}, "
          f"{NUM_CLASSES} classes, head width {args.channels or 'paper (512)'}, repeats {args.repeats}")
    start = time.perf_counter()
    results = {(a, part): run_child(args, a, part) for a in ("interlaced", "full") for part in ("block", "head")}
    if not args.skip_heads:
        for name in args.backbones:
            bench_backbone(name, args, device)
    if not args.skip_pose and not args.skip_heads:
        bench_pose(args, device)
    h, w = results["full", "block"]["map"]
    memory = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS growth (VmHWM)"
    print(f"\nISSA vs full self-attention, resnet18-OS-8 features ({h}x{w} map, {h * w} positions), "
          f"forward+backward, {memory}:")
    for part in ("block", "head"):
        for attention in ("interlaced", "full"):
            r = results[attention, part]
            note = "" if device.type == "cuda" else f"   (peak before the pass {r['hidden_mib']:.1f} MiB above RSS)"
            print(f"  {part:5s} {attention:10s} {r['seconds'] * 1e3:9.0f} ms {r['peak_mib']:9.1f} MiB{note}")
    ratio = lambda key, part: results["interlaced", part][key] / max(results["full", part][key], 1e-12)  # noqa: E731
    print(f"dense_issa_vs_full_head_time_ratio={ratio('seconds', 'head'):.3f}")
    print(f"dense_issa_vs_full_head_memory_ratio={ratio('peak_mib', 'head'):.3f}")
    print(f"dense_issa_vs_full_time_ratio={ratio('seconds', 'block'):.3f}")
    print(f"(total {time.perf_counter() - start:.0f} s)")
    print(f"dense_issa_vs_full_memory_ratio={ratio('peak_mib', 'block'):.3f}")


if __name__ == "__main__":
    main()
