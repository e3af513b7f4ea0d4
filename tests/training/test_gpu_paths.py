"""The CUDA paths of training and inference: bf16 autocast, channels_last, the compiled step, pinned batches.

Every test here is marked ``gpu`` and skips without CUDA, so CPU runs (``make test``) collect and skip them;
``pytest -m gpu`` (bench/gpu_check.sh, on the device) runs them. The module imports only torch, timm, numpy and
the light geoclip modules: the GPU machine lacks MLflow, rasterio and pandas, which tests/factories.py needs, so
the one test that runs the whole training stage imports them itself and skips where they are missing.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from geoclip.bands import ALL_BAND_NAMES
from geoclip.model.clip import GeoCLIP, ModelConfig, predict_batches
from geoclip.model.loss import LOSSES
from geoclip.training import train_data
from geoclip.training.step import EmbeddingStep, lr_schedule, make_optimizer, training_step
from geoclip.training.train_data import TrainTiles, fits_on_device

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device "
                                 "(torch.cuda.is_available() is False)")]

TINY_ENCODER = "test_resnet"  # tests/factories.py's tiny timm net, named here so this module needs no MLflow
N_CLASSES = 3
LR, WEIGHT_DECAY, WARMUP_FRACTION, GAIN_NOISE = 3e-3, 1e-4, 0.1, 0.05


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device the tests run on."""
    return torch.device("cuda")


def tiny_model(seed: int = 0) -> GeoCLIP:
    """A seeded tiny GeoCLIP for 13 bands and three classes, with random prompt features (no sentence encoder)."""
    torch.manual_seed(seed)
    names = [f"class{i}" for i in range(N_CLASSES)]
    cfg = ModelConfig(image_encoder=TINY_ENCODER, embed_dim=32, band_names=list(ALL_BAND_NAMES), class_names=names,
                      prompts=[[f"an image of {c}."] for c in names], band_mean=[1500.0] * 13,
                      band_std=[800.0] * 13)
    return GeoCLIP(cfg, prompt_features=torch.randn(N_CLASSES, 1, 384))


def on_gpu(model: GeoCLIP, device: torch.device) -> GeoCLIP:
    """``model`` as training places it on a GPU (geoclip.training.train._seeded_model): there, in channels_last."""
    return model.to(device).to(memory_format=torch.channels_last)


def separable_tiles(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` raw int32 tiles (as training serves them) whose class sets the band levels, and their labels."""
    spectra = np.random.default_rng(100).uniform(500, 4000, size=(N_CLASSES, 13))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    x = spectra[y][:, :, None, None] * rng.uniform(0.8, 1.2, (n, 1, 1, 1)) + rng.normal(0, 150, (n, 13, 64, 64))
    return (torch.from_numpy(np.clip(x, 1, 20000).astype(np.int32)).to(device),
            torch.from_numpy(y).to(device))


def run_steps(model: GeoCLIP, step_module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *,
              bf16: bool, channels_last: bool) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` training steps on the batch ``(x, y)`` with training's optimiser and schedule; losses and optimiser.

    The augmentation generator is seeded the same in every call, so two calls see the same augmented tiles.
    """
    opt = make_optimizer(model, LR, WEIGHT_DECAY)
    sched = lr_schedule(opt, steps, WARMUP_FRACTION)
    gen = torch.Generator().manual_seed(0)
    cls_idx = torch.arange(N_CLASSES, device=x.device)
    losses = [training_step(step_module, model, opt, sched, x, y, cls_idx, loss_fn=LOSSES["clip"], generator=gen,
                            gain_noise=GAIN_NOISE, bf16=bf16, channels_last=channels_last) for _ in range(steps)]
    return losses, opt


def test_a_bf16_channels_last_step_trains_on_cuda(cuda):
    """Training's GPU step: channels_last input under bf16 autocast, fused AdamW, float32 weights that learn."""
    model = on_gpu(tiny_model(), cuda)
    step_module = EmbeddingStep(model)
    seen: dict[str, object] = {}
    step_module.register_forward_pre_hook(lambda _, args: seen.update(
        channels_last=args[0].is_contiguous(memory_format=torch.channels_last),
        autocast=torch.is_autocast_enabled("cuda")))
    model.image_proj.register_forward_hook(lambda _, args, out: seen.update(proj_dtype=out.dtype))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    x, y = separable_tiles(48, cuda)
    losses, opt = run_steps(model, step_module, x, y, 30, bf16=True, channels_last=True)
    assert seen == {"channels_last": True, "autocast": True, "proj_dtype": torch.bfloat16}
    assert all(loss.device == x.device and loss.dtype == torch.float32 for loss in losses)
    values = torch.stack(losses).tolist()
    assert all(math.isfinite(v) for v in values)
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.1, values  # it learns the separable classes
    assert all(group["fused"] is True for group in opt.param_groups)  # one fused AdamW kernel on CUDA
    params = dict(model.named_parameters())
    assert all(params[name].dtype == torch.float32 for name in before)  # autocast, not a bf16 copy of the weights
    assert [name for name in before if torch.equal(params[name], before[name])] == []  # every trainable one moved
    kernels = [name for name, p in params.items() if p.ndim == 4]
    assert kernels and all(params[name].is_contiguous(memory_format=torch.channels_last) for name in kernels)


def test_the_bf16_loss_is_the_float32_loss_within_bf16_precision_on_cuda(cuda):
    """The first step's loss (before any update) under bf16 autocast + channels_last is the float32 loss, roughly."""
    model = tiny_model()
    x, y = separable_tiles(48, cuda)
    fast = on_gpu(copy.deepcopy(model), cuda)
    plain = model.to(cuda)
    (fast_loss,), _ = run_steps(fast, EmbeddingStep(fast), x, y, 1, bf16=True, channels_last=True)
    (plain_loss,), _ = run_steps(plain, EmbeddingStep(plain), x, y, 1, bf16=False, channels_last=False)
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=2e-2)


def test_the_compiled_step_gives_the_eager_steps_losses_on_cuda(cuda):
    """torch.compile of the step module (train.compile "default": dynamic=False) follows the eager run step by step."""
    from torch._dynamo.utils import counters

    eager_model = on_gpu(tiny_model(), cuda)
    compiled_model = copy.deepcopy(eager_model)
    x, y = separable_tiles(48, cuda)
    torch._dynamo.reset()
    counters.clear()
    compiled_step = torch.compile(EmbeddingStep(compiled_model), mode="default", dynamic=False)
    steps = 6
    compiled_losses, _ = run_steps(compiled_model, compiled_step, x, y, steps, bf16=True, channels_last=True)
    eager_losses, _ = run_steps(eager_model, EmbeddingStep(eager_model), x, y, steps, bf16=True, channels_last=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the step (no silent eager fallback)
    eager, compiled = torch.stack(eager_losses).tolist(), torch.stack(compiled_losses).tolist()
    assert compiled == pytest.approx(eager, rel=2e-2, abs=2e-2)
    # The losses move by far more than that tolerance, so a compiled step that stopped updating would differ.
    assert eager[-1] < eager[0] - 0.2, eager


def test_train_compile_wraps_the_step_on_cuda_only_when_asked(cuda):
    """geoclip.training.train.compiled: a compiled module around the step for a mode, the step itself for "off"."""
    try:
        from geoclip.training.train import compiled
    except ImportError as exc:  # the GPU machine: training's data side needs packages it lacks
        pytest.skip(f"geoclip.training.train does not import here ({exc.name} missing)")
    step_module = EmbeddingStep(on_gpu(tiny_model(), cuda))
    assert compiled(step_module, "off", cuda) is step_module
    for mode in ("default", "reduce-overhead"):
        wrapped = compiled(step_module, mode, cuda)
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is step_module


def test_pack_batches_reach_the_gpu_through_pinned_memory(cuda, tmp_path, monkeypatch):
    """The DataLoader path pins each batch before its non-blocking copy; it serves what the on-device path serves."""
    images = np.random.default_rng(0).integers(0, 65536, size=(10, 13, 8, 8), dtype=np.uint16)
    images[0, 0, 0, :2] = (65535, 40000)  # above int16's range: the int16 bit-view must widen back to these
    np.save(tmp_path / "train_images.npy", images)
    rows = np.array([0, 2, 3, 5, 7, 9])
    index_batches = [torch.tensor([0, 1, 2]), torch.tensor([5, 3])]
    pinned: list[bool] = []

    class SpyLoader(train_data.DataLoader):
        """DataLoader that records whether each batch it yields is in pinned memory."""

        def __iter__(self):
            for batch in super().__iter__():
                pinned.append(batch.is_pinned())
                yield batch

    monkeypatch.setattr(train_data, "DataLoader", SpyLoader)
    loaded = list(TrainTiles(tmp_path / "train_images.npy", images, rows, cuda, seed=0, on_device=False,
                             workers=0).batches(index_batches, epoch=1))
    resident = TrainTiles(tmp_path / "train_images.npy", images, rows, cuda, seed=0, on_device=True)
    assert resident.nbytes == images[rows].nbytes  # int16 bit-view on the GPU: the uint16 pack's size
    assert pinned == [True, True]
    for idx, got, kept in zip(index_batches, loaded, resident.batches(index_batches, epoch=1), strict=True):
        want = torch.from_numpy(images[rows][idx.numpy()].astype(np.int32))
        assert got.device == kept.device == torch.device("cuda", torch.cuda.current_device())
        assert got.dtype == kept.dtype == torch.int32
        assert torch.equal(got.cpu(), want) and torch.equal(kept.cpu(), want)


def test_fits_on_device_reads_the_gpus_free_memory(cuda):
    """Tiles stay on the GPU when they take a small part of its free memory, never when they exceed all of it."""
    free, total = torch.cuda.mem_get_info(cuda)
    assert fits_on_device(1 << 20, cuda)
    assert not fits_on_device(free + 1, cuda) and not fits_on_device(total, cuda)


def test_inference_pins_batches_and_runs_bf16_channels_last_on_cuda(cuda, monkeypatch):
    """predict_batches on CUDA: pinned int32 batches, channels_last under bf16 autocast; float32 out, as on the CPU."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    images = separable_tiles(10, torch.device("cpu"))[0].numpy().astype(np.uint16)
    pins: list[bool] = []
    original_pin = torch.Tensor.pin_memory

    def spy_pin(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = original_pin(self, *args, **kwargs)
        pins.append(out.is_pinned())
        return out

    model = on_gpu(model, cuda)
    inputs: list[tuple] = []
    original_predict = model.predict

    def spy_predict(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        inputs.append((x.device.type, x.dtype, x.is_contiguous(memory_format=torch.channels_last),
                       torch.is_autocast_enabled("cuda")))
        return original_predict(x, **kwargs)

    monkeypatch.setattr(model, "predict", spy_predict)
    monkeypatch.setattr(torch.Tensor, "pin_memory", spy_pin)
    probs, emb = predict_batches(model, images, batch_size=4, device=cuda)
    assert pins == [True] * 3  # batches of 4, 4 and 2
    assert inputs == [("cuda", torch.int32, True, True)] * 3
    ref_probs, ref_emb = predict_batches(reference, images, batch_size=4, device="cpu")
    assert probs.dtype == emb.dtype == np.float32 and probs.shape == ref_probs.shape and emb.shape == ref_emb.shape
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(emb, ref_emb, atol=3e-2)  # bf16 rounding, not another computation
    np.testing.assert_allclose(probs, ref_probs, atol=2e-2)


@pytest.mark.parametrize(("compile_mode", "data_path"), [("default", "device"), ("off", "loader")])
def test_a_tiny_training_run_on_cuda_learns_and_saves_a_model_the_cpu_loads(cuda, tmp_path, monkeypatch,
                                                                          compile_mode, data_path):
    """The training stage on CUDA, compiled with tiles kept on the GPU, or eager from pinned pack batches."""
    pytest.importorskip("mlflow", reason="the training stage logs to MLflow, not installed here")
    factories = pytest.importorskip("factories", reason="tests/factories.py needs rasterio and pandas")
    from geoclip.config import params_from_dict
    from geoclip.model.clip import load_model
    from geoclip.stages import train

    factories.make_packs(tmp_path / "prepared", per_class=12)
    if data_path == "loader":
        monkeypatch.setattr("geoclip.training.train.fits_on_device", lambda *args: False)
    params = params_from_dict(factories.tiny_params_dict(tmp_path, image_encoder=TINY_ENCODER, epochs=4,
                                                         batch_size=6, compile=compile_mode))
    with factories.own_tracking_store():
        result = train(params)
    import mlflow

    tags = mlflow.MlflowClient(params.mlflow.tracking_uri).get_run(result["run_id"]).data.tags
    assert tags["data_path"] == data_path
    history = json.loads((Path(params.paths.model) / "history.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    model = load_model(params.paths.model)  # saved from the channels_last CUDA model, loaded on the CPU
    probs, _ = model.predict(torch.from_numpy(factories.synthetic_tiles(3).astype(np.float32)))
    assert torch.isfinite(probs).all() and probs.sum(dim=1).allclose(torch.ones(3), atol=1e-5)
