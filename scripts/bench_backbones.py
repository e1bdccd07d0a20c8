#!/usr/bin/env python
"""Forward and backward throughput and peak memory of every registered backbone, and interlaced
sparse attention against full self-attention on a 128x128 feature map.

Each measurement runs in its own subprocess, so that peak memory (the process's peak resident
set on the CPU, torch.cuda.max_memory_allocated on a GPU) belongs to that measurement alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workbench.backbones import create_backbone, list_backbones  # noqa: E402
from workbench.runtime import seconds_per_call  # noqa: E402

INPUT_SIZE = {"impala": 64, "lenet": 32, "dtn": 32}


def input_size(name: str) -> int:
    return next((s for prefix, s in INPUT_SIZE.items() if name.startswith(prefix)), 224)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_backbone(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    size = input_size(name)
    model = create_backbone(name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    params = sum(p.numel() for p in model.parameters())
    before = peak_bytes(device)

    def forward():
        with torch.inference_mode():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()

    fwd = seconds_per_call(forward, repeats, device)
    train = seconds_per_call(forward_backward, repeats, device)
    return {"name": name, "params_m": params / 1e6, "input": size, "batch": batch, "forward_per_s": batch / fwd,
            "train_per_s": batch / train, "peak_mib": (peak_bytes(device) - before) / 2**20}


def measure_attention(kind: str, size: int, channels: int, repeats: int, device: torch.device) -> dict:
    from workbench.layers import InterlacedSparseAttention, SelfAttention2d

    layer = (InterlacedSparseAttention(channels, channels // 2, channels, (8, 8)) if kind == "interlaced"
             else SelfAttention2d(channels, channels // 2, channels)).to(device)
    x = torch.randn(1, channels, size, size, device=device)
    before = peak_bytes(device)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    seconds = seconds_per_call(forward_backward, repeats, device)
    return {"name": kind, "seconds": seconds, "peak_mib": (peak_bytes(device) - before) / 2**20}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="*", default=None, help="default: all registered")
    p.add_argument("--batch", type=int, default=8, help="batch for 224x224 models (x8 for the small-input ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--map-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.child:
        kind, name = args.child
        if kind == "backbone":
            batch = args.batch * (8 if input_size(name) < 224 else 1)
            print(json.dumps(measure_backbone(name, batch, args.repeats, device)))
        else:
            print(json.dumps(measure_attention(name, args.map_size, args.channels, args.repeats, device)))
        return
    common = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--map-size", str(args.map_size),
              "--channels", str(args.channels), "--device", args.device]
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'backbone':16s} {'params':>8s} {'input':>5s} {'batch':>5s} {'fwd/s':>9s} {'fwd+bwd/s':>10s} {'peak MiB':>9s}")
    for name in args.backbones or list_backbones():
        r = run_child(["--child", "backbone", name, *common])
        print(f"{name:16s} {r['params_m']:7.2f}M {r['input']:5d} {r['batch']:5d} {r['forward_per_s']:9.1f} "
              f"{r['train_per_s']:10.1f} {r['peak_mib']:9.0f}", flush=True)
    full = run_child(["--child", "attention", "full", *common])
    sparse = run_child(["--child", "attention", "interlaced", *common])
    print(f"attention on a {args.map_size}x{args.map_size} map, {args.channels} channels, forward+backward:")
    for r in (full, sparse):
        print(f"  {r['name']:10s} {r['seconds'] * 1000:9.1f} ms {r['peak_mib']:9.0f} MiB")
    print(f"interlaced_vs_full_time_ratio={sparse['seconds'] / full['seconds']:.3f}")
    print(f"interlaced_vs_full_memory_ratio={sparse['peak_mib'] / max(full['peak_mib'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
