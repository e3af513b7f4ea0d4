"""Training throughput (images/s) of a timm image encoder on 13-band 64x64 tiles: fp32 on CPU, bf16 on CUDA."""

from __future__ import annotations

import argparse
import time

import timm
import torch


def measure(model_name: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images per second for forward + backward + AdamW step at ``batch_size``."""
    model = timm.create_model(model_name, pretrained=False, in_chans=13, num_classes=128).to(device)
    cuda = device.type == "cuda"
    if cuda:  # same fast path as geoclip.train on GPUs
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 13, 64, 64, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    """Print images/s for each batch size given on the command line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    mode = "bf16+channels_last" if device.type == "cuda" else "fp32"
    for bs in args.batch_sizes:
        ips = measure(args.model, bs, args.steps, args.warmup, device)
        print(f"{args.model} {device.type} {mode} threads={torch.get_num_threads()} batch={bs}: {ips:.1f} images/s")


if __name__ == "__main__":
    main()
