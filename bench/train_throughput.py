"""Training throughput of GeoCLIP's step on 13-band 64x64 tiles: images/s and fraction of peak FLOP/s.

One step = training's own step, ``geoclip.training.step.training_step``: augmentation of raw tiles, image
encoder + projection forward, class embeddings, the ``--loss`` contrastive loss with the logit scale and bias,
backward, AdamW step (training's parameter groups), learning-rate schedule step and logit-scale clamp, on data
already on the device. Per model, batch size and mode (precision, channels_last, torch.compile of the module
DDP wraps in training off/on). Warm-up steps (the first one compiles) are not timed; each timed
step is bracketed by CUDA synchronisation and the median step time is reported. FLOPs of one step
(forward + backward) come from ``torch.utils.flop_counter.FlopCounterMode`` on the eager model;
achieved FLOP/s = FLOPs / median step time, divided by the device peak for the fraction of peak.
``--smoke`` instead trains a small model on separable synthetic tiles and checks that it learns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from geoclip.bands import ALL_BAND_NAMES
from geoclip.model.clip import GeoCLIP, ModelConfig
from geoclip.model.loss import LOSSES
from geoclip.training.step import EmbeddingStep, lr_schedule, make_optimizer, training_step

N_CLASSES, TILE, EMBED = 10, 64, 128
# params.yaml's train defaults (geoclip.config needs PyYAML, which the GPU machine may lack); values, not cost.
LR, WEIGHT_DECAY, WARMUP_FRACTION, GAIN_NOISE = 1e-3, 1e-4, 0.1, 0.05
# Dense BF16 Tensor Core peaks from NVIDIA's datasheets (the sparse figures halved).
GPU_PEAKS = [("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet: BF16 1513 TFLOPS sparse = 756 dense"),
             ("H100", 989.0, "NVIDIA H100 SXM datasheet: BF16 1979 TFLOPS sparse = 989 dense"),
             ("H200", 989.0, "NVIDIA H200 SXM datasheet: BF16 1979 TFLOPS sparse = 989 dense")]


def make_model(name: str, n_classes: int = N_CLASSES, seed: int = 0, loss: str = "clip") -> GeoCLIP:
    """A GeoCLIP with a timm ``name`` encoder for 13 bands and random prompt features (no sentence encoder)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(image_encoder=name, embed_dim=EMBED, band_names=list(ALL_BAND_NAMES),
                      class_names=[f"class{i}" for i in range(n_classes)], prompts=[["p"]] * n_classes,
                      band_mean=[1500.0] * 13, band_std=[800.0] * 13, loss=loss)
    return GeoCLIP(cfg, torch.randn(n_classes, 1, 384))


def make_step(model: GeoCLIP, x: torch.Tensor, labels: torch.Tensor, bf16: bool, channels_last: bool,
              compiled: str, loss: str, total_steps: int):
    """A closure running training's step on ``x`` with training's optimiser and schedule; returns the loss."""
    opt = make_optimizer(model, LR, WEIGHT_DECAY)
    sched = lr_schedule(opt, total_steps, WARMUP_FRACTION)
    step_module = EmbeddingStep(model)
    # train.compile's modes ("on" = "default"); on the CPU too, unlike training, to measure what it would give.
    mode = None if compiled in ("on", "default") else compiled
    fwd = step_module if compiled == "off" else torch.compile(step_module, mode=mode, dynamic=False)
    cls_idx = torch.arange(len(model.cfg.class_names), device=x.device)
    gen = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        return training_step(fwd, model, opt, sched, x, labels, cls_idx, loss_fn=LOSSES[loss], generator=gen,
                             gain_noise=GAIN_NOISE, bf16=bf16, channels_last=channels_last)

    return step


def count_flops(step) -> int:
    """FLOPs of one step (forward + backward matmuls/convolutions), by torch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak(bf16: bool) -> tuple[float, str]:
    """Peak TFLOP/s of this CPU estimated as threads x GHz x FLOPs/cycle, and the assumption."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    mhz = [float(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
    ghz = max(mhz) / 1000 if mhz else 2.0
    if bf16 and "amx_bf16" in flags:
        fpc, isa = 1024, "AMX bf16"
    elif bf16 and "avx512_bf16" in flags:
        fpc, isa = 128, "AVX-512 bf16: 2 FMA x 32 lanes x 2"
    elif "avx512f" in flags:
        fpc, isa = 64, "AVX-512 fp32: 2 FMA x 16 lanes x 2"
    elif "avx2" in flags and "fma" in flags:
        fpc, isa = 32, "AVX2 fp32: 2 FMA x 8 lanes x 2"
    else:
        fpc, isa = 8, "SSE fp32: 1 add + 1 mul x 4 lanes"
    cores = torch.get_num_threads()
    peak = cores * ghz * fpc / 1000
    return peak, f"CPU estimate: {cores} threads x {ghz:.2f} GHz (cpu MHz) x {fpc} FLOPs/cycle ({isa})"


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (else the platform's processor string)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def device_peak(device: torch.device, bf16: bool, override: float) -> tuple[float | None, str]:
    """The peak TFLOP/s the measurements are divided by, and where it comes from."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return cpu_peak(bf16)
    name = torch.cuda.get_device_name(device)
    if bf16:
        for key, peak, source in GPU_PEAKS:
            if key in name:
                return peak, source
    return None, f"unknown peak for {name} ({'bf16' if bf16 else 'fp32'}): pass --peak-tflops"


def measure(name: str, batch: int, device: torch.device, bf16: bool, channels_last: bool, compiled: str,
            steps: int, warmup: int, flops: int | None, loss: str = "clip") -> dict:
    """One configuration's step time, images/s and FLOPs per step (``flops`` reused when given)."""
    torch._dynamo.reset()  # a fresh compile per configuration; no recompile limits across shapes
    model = make_model(name, loss=loss).to(device)
    # Raw digital numbers as int32, what training's tile batches are (widened from the packs' uint16).
    x = torch.randint(200, 4000, (batch, 13, TILE, TILE), device=device, dtype=torch.int32)
    labels = torch.randint(0, N_CLASSES, (batch,), device=device)
    if channels_last:  # the step makes its input channels_last; the weights are made so here, as in training
        model = model.to(memory_format=torch.channels_last)
    total = warmup + steps + 1  # the schedule spans every step run here (the flop count's included)
    if flops is None:
        flops = count_flops(make_step(model, x, labels, bf16, channels_last, "off", loss, total))
    step = make_step(model, x, labels, bf16, channels_last, compiled, loss, total)
    sync(device)
    t0 = time.perf_counter()
    step()  # the first step compiles when compile is on: reported, never timed with the rest
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    times, c0 = [], time.process_time()
    for _ in range(steps):  # each step timed alone: the median resists bursts from other processes
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    # CPU seconds used per wall second: well below the thread count means other processes shared the cores.
    cpu_util = (time.process_time() - c0) / sum(times)
    return {"step_s": step_s, "step_s_mean": float(np.mean(times)), "images_per_s": batch / step_s,
            "flops_per_step": flops, "first_step_s": first_s, "process_cpu_util": cpu_util}


def run_bench(args, device: torch.device) -> list[dict]:
    """Measure every model x batch size x compile mode; write JSON after each row (a timeout keeps the rest)."""
    bf16 = (device.type == "cuda" and not args.fp32) or args.bf16
    peak, source = device_peak(device, bf16, args.peak_tflops)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
           "channels_last": not args.no_channels_last, "peak_tflops": peak, "peak_source": source,
           "steps": args.steps, "warmup": args.warmup, "loss": args.loss}
    print(f"# {env['device']} | torch {env['torch']} | threads {env['threads']} | {env['precision']} | "
          f"channels_last {env['channels_last']} | loss {args.loss} | peak {peak} TFLOP/s ({source})")
    print(f"{'model':10} {'batch':>6} {'compile':>15} {'img/s':>10} {'step ms':>9} {'GFLOP/step':>11} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'1st step s':>10} {'cpu util':>8}")
    rows: list[dict] = []
    for name in args.models:
        for batch in args.batch_sizes:
            flops = None
            for mode in args.compile:
                row = {"model": name, "batch": batch, "compile": mode, **env}
                try:
                    row |= measure(name, batch, device, bf16, env["channels_last"], mode, args.steps,
                                   args.warmup, flops, args.loss)
                except Exception as exc:  # noqa: BLE001 - an OOM or a compile failure costs one row, not the run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                    print(f"{name:10} {batch:>6} {mode:>15} failed: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    flops = row["flops_per_step"]
                    row["achieved_tflops"] = flops / row["step_s"] / 1e12
                    row["fraction_of_peak"] = row["achieved_tflops"] / peak if peak else None
                    frac = f"{100 * row['fraction_of_peak']:.1f}" if peak else "n/a"
                    print(f"{name:10} {batch:>6} {mode:>15} {row['images_per_s']:>10.1f} {1e3 * row['step_s']:>9.1f} "
                          f"{flops / 1e9:>11.1f} {row['achieved_tflops']:>8.3f} {frac:>6} {row['first_step_s']:>10.1f} "
                          f"{row['process_cpu_util']:>8.2f}", flush=True)
                rows.append(row)
                if args.out:
                    write_rows(args.out, rows)
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Write the rows as JSON, atomically (temp file, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, out)


def smoke(device: torch.device, steps: int, out: str | None, name: str = "resnet18") -> bool:
    """Train a small model with training's step on separable synthetic tiles on ``device`` (data there).

    Returns whether it learned: held-out top-1 >= 0.9 and the last loss below the first.
    """
    cuda = device.type == "cuda"
    rng = np.random.default_rng(0)
    spectra = rng.uniform(500, 4000, size=(3, 13))

    def tiles(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, 3, n)
        x = spectra[y][:, :, None, None] * rng.uniform(0.8, 1.2, (n, 1, 1, 1)) + rng.normal(0, 150, (n, 13, TILE, TILE))
        # int32 on the device: uint16 lacks CUDA kernels (geoclip.training.train keeps an int16 bit-view and widens it).
        return torch.from_numpy(np.clip(x, 1, 20000).astype(np.int32)).to(device), torch.from_numpy(y).to(device)

    x_train, y_train = tiles(512)
    x_test, y_test = tiles(128)
    torch.manual_seed(0)
    model = make_model(name, n_classes=3).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, LR, WEIGHT_DECAY)
    sched = lr_schedule(opt, steps, WARMUP_FRACTION)
    step_module, cls_idx = EmbeddingStep(model), torch.arange(3, device=device)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (64,), generator=gen).to(device)
        loss = training_step(step_module, model, opt, sched, x_train[idx], y_train[idx], cls_idx,
                             loss_fn=LOSSES["clip"], generator=gen, gain_noise=GAIN_NOISE, bf16=cuda,
                             channels_last=cuda)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        pred = model(x_test.float().contiguous(memory_format=torch.channels_last) if cuda else x_test.float())
    top1 = float((pred.argmax(1) == y_test).float().mean())
    ok = top1 >= 0.9 and np.mean(losses[-5:]) < np.mean(losses[:5])
    result = {"device": str(device), "model": name, "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
              "test_top1": top1, "bf16": cuda, "channels_last": cuda, "ok": bool(ok)}
    print(json.dumps(result))
    if out:
        write_rows(out, [result])
    return bool(ok)


def main() -> int:
    """Parse arguments; run the smoke check or the throughput table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="default: 32 64 128 on CPU, 256 512 1024 2048 4096 on CUDA")
    ap.add_argument("--compile", nargs="+", choices=["off", "on", "default", "reduce-overhead", "max-autotune"],
                    default=["off", "on"], help="train.compile modes to time (on = default)")
    ap.add_argument("--loss", choices=sorted(LOSSES), default="clip", help="train.loss (siglip trains the bias)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps incl. the first (default: 1 CPU, 5 CUDA)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too")
    ap.add_argument("--fp32", action="store_true", help="fp32 on CUDA (default there: bf16 autocast)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (default: datasheet / CPU estimate)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--smoke", action="store_true", help="check that a small model learns on the device, then exit")
    ap.add_argument("--smoke-steps", type=int, default=60)
    ap.add_argument("--smoke-model", default="resnet18")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if args.smoke:
        return 0 if smoke(device, args.smoke_steps, args.out, args.smoke_model) else 1
    cuda = device.type == "cuda"
    args.batch_sizes = args.batch_sizes or ([256, 512, 1024, 2048, 4096] if cuda else [32, 64, 128])
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup or (5 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes per row: let cuDNN pick its fastest kernels
    rows = run_bench(args, device)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
