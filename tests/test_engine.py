"""The engine as the one door to the model: every model call of every method, metric and dataset filter goes
through it (counted by the engine and by the model itself), out-of-memory halving exists once and works (a fake
forward that raises torch.cuda.OutOfMemoryError above a batch size, on the CPU), and precision (autocast) keeps
dtypes and stays close to fp32."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastig
from fastig import methods
from fastig.attr import IntegratedGradients, LatentIntegratedGradients, Occlusion, SecondOrderGradients
from fastig.cli import cli
from fastig.core import engine as engine_module
from fastig.core.engine import Engine, count_calls
from fastig.metrics import completeness, deletion, insertion, lossy_mse, pic


class RGBNet(torch.nn.Module):
    """conv-relu-pool-conv-relu-avgpool-linear on [N, 3, H, W]: 10 logits."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
        )
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class ModelCalls:
    """Counts the calls of every module of the given class, whoever makes them (a global forward hook)."""

    def __init__(self, cls):
        self.cls, self.calls = cls, 0

    def __enter__(self):
        def hook(module, _inputs, _output):
            if type(module) is self.cls:
                self.calls += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def through_the_engine(cls, fn):
    """Run ``fn`` and check that every call of a ``cls`` model went through the engine (and that there were some)."""
    with ModelCalls(cls) as model_calls, count_calls() as engine_calls:
        fn()
    assert model_calls.calls > 0
    assert engine_calls.calls == model_calls.calls, (engine_calls.calls, model_calls.calls)


# Small settings for every registered method on 2 RGB images of 16x16.
SMALL = {
    "ig": {"n_steps": 4}, "guided_ig": {"n_steps": 4}, "blur_ig": {"n_steps": 4, "max_sigma": 2.0},
    "gnl_ig": {"n_steps": 4}, "smoothgrad": {"nt_samples": 2, "stdevs": 0.1}, "gradient_shap": {"n_samples": 2},
    "occlusion": {"window": 8, "stride": 8}, "feature_ablation": {"n_segments": 4},
    "shapley": {"n_segments": 4, "n_samples": 2}, "lime": {"n_segments": 4, "n_samples": 8},
    "kernel_shap": {"n_segments": 4, "n_samples": 8}, "meaningful_perturbation": {"n_iter": 2},
    "pda": {"window": 8, "stride": 8, "n_samples": 2},
}


def _small_dvae():
    from test_latent_ig import small_dvae  # the latent IG tests' tiny random dVAE

    return small_dvae()


@pytest.mark.parametrize("name", methods.names())
def test_every_method_calls_the_model_only_through_the_engine(name):
    model = RGBNet().eval()
    x = torch.rand(2, 3, 16, 16)
    options = dict(SMALL.get(name, {}))
    if name == "latent_ig":
        method = LatentIntegratedGradients(model, _small_dvae())
        through_the_engine(RGBNet, lambda: method.attribute(x, target=[1, 2], n_steps=3, gap_steps=1))
        return
    if methods.get(name).path_method:
        options["return_convergence_delta"] = True
    through_the_engine(RGBNet, lambda: fastig.attribute(model, x, target=[1, 2], method=name, **options))


@pytest.mark.parametrize("extra", [{"top_k": 2}, {"target": [[1, 2], [3, 4]], "idgi": True}])
def test_several_targets_and_top_k_go_through_the_engine(extra):
    model = RGBNet().eval()
    x = torch.rand(2, 3, 16, 16)
    through_the_engine(RGBNet, lambda: IntegratedGradients(model).attribute(x, n_steps=3, **extra))
    through_the_engine(RGBNet, lambda: SecondOrderGradients(model).attribute(x, top_k=2))


def test_every_metric_calls_the_model_only_through_the_engine():
    model = RGBNet().eval()
    x = torch.rand(2, 3, 16, 16)
    saliency = torch.rand(2, 16, 16)
    through_the_engine(RGBNet, lambda: insertion(model, x, saliency, step=32))
    through_the_engine(RGBNet, lambda: deletion(model, x, saliency, target=3, step=32))
    images = (np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    through_the_engine(RGBNet, lambda: pic(model, images, saliency.numpy(), min_pred_value=0.0, num_data_points=10,
                                           thresholds=(0.1, 0.5)))
    through_the_engine(RGBNet, lambda: lossy_mse(model, list(images), method="saliency"))
    through_the_engine(RGBNet, lambda: completeness(model, x, method="ig", n_steps=3))


def test_the_dataset_run_filter_pass_goes_through_the_engine(tmp_path):
    from test_run import spec, write_list_dataset

    from fastig.models.centerpixel import CenterPixelNet
    from fastig.run import run

    listing = write_list_dataset(tmp_path / "data", 4)
    through_the_engine(CenterPixelNet, lambda: run(spec(tmp_path / "out", listing, correct_only=True,
                                                         options={"n_steps": 2})))


def test_out_of_memory_handling_is_written_once():
    package = Path(fastig.__file__).parent
    handlers = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if "OutOfMemoryError" in p.read_text()]
    assert handlers == ["core/engine.py"]


class OutOfMemoryAbove(torch.nn.Module):
    """RGBNet that raises torch.cuda.OutOfMemoryError (as a full GPU would) for batches of more than ``limit`` rows."""

    def __init__(self, limit):
        super().__init__()
        self.net, self.limit = RGBNet(), limit
        self.sizes, self.failures = [], 0

    def forward(self, x, *args):
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"fake: {x.shape[0]} rows > {self.limit}")
        self.sizes.append(x.shape[0])
        return self.net(x)


def test_out_of_memory_halves_retries_and_remembers_for_every_kind_of_pass():
    torch.manual_seed(0)
    model = OutOfMemoryAbove(limit=5).eval()
    x = torch.rand(3, 3, 8, 8)
    reference = IntegratedGradients(model).attribute(x, target=1, n_steps=8, internal_batch_size=5)

    got = IntegratedGradients(model).attribute(x, target=1, n_steps=8)  # 24 points at once on this CPU
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
    assert model.failures >= 1 and max(model.sizes) <= 5
    failures = model.failures
    again = IntegratedGradients(model).attribute(x, target=1, n_steps=8)  # the size that fit is remembered
    assert model.failures == failures
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-7)

    # forward-only passes (perturbation copies) learn their own size, through the same code
    occlusion = Occlusion(model).attribute(x, sliding_window_shapes=(3, 4, 4), strides=4, target=1)
    expected = Occlusion(model).attribute(x, sliding_window_shapes=(3, 4, 4), strides=4, target=1,
                                          perturbations_per_eval=1)
    torch.testing.assert_close(occlusion, expected)
    assert model.failures > failures and max(model.sizes) <= 5

    # metrics and 2ndG too
    saliency = torch.rand(3, 8, 8)
    small = insertion(model, x, saliency, step=16, batch_size=None)
    torch.testing.assert_close(torch.as_tensor(small.scores),
                               torch.as_tensor(insertion(model, x, saliency, step=16, batch_size=1).scores))
    maps = SecondOrderGradients(model, "net.features").attribute(x, target=2)
    torch.testing.assert_close(maps, SecondOrderGradients(model, "net.features").attribute(x, target=2,
                                                                                             internal_batch_size=4))
    assert max(model.sizes) <= 5


def test_a_fixed_batch_size_that_runs_out_of_memory_is_an_error():
    model = OutOfMemoryAbove(limit=2).eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        IntegratedGradients(model).attribute(x, target=1, n_steps=8, internal_batch_size=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Occlusion(model).attribute(x, sliding_window_shapes=(3, 4, 4), target=1, perturbations_per_eval=4)


def test_one_row_that_does_not_fit_is_an_error():
    model = OutOfMemoryAbove(limit=0).eval()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        IntegratedGradients(model).attribute(torch.rand(1, 3, 8, 8), target=1, n_steps=2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_autocasts_the_passes_and_keeps_the_callers_dtypes(precision):
    torch.manual_seed(0)
    model = RGBNet().eval()
    x = torch.rand(2, 3, 16, 16)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    exact, exact_delta = IntegratedGradients(model).attribute(x, target=[1, 2], n_steps=8,
                                                              return_convergence_delta=True)
    low, delta = IntegratedGradients(model).attribute(x, target=[1, 2], n_steps=8, precision=precision,
                                                      return_convergence_delta=True)
    assert seen[0] == torch.float32 and seen[-1] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert low.dtype == x.dtype and delta.dtype == exact_delta.dtype
    error = ((low - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.15  # measured 6.4e-2 (bf16) and 3.1e-2 (fp16) on this random net
    # float64 inputs are not autocast: the same numbers as at fp32 precision
    model64 = RGBNet().double().eval()
    x64 = x.double()
    torch.testing.assert_close(IntegratedGradients(model64).attribute(x64, target=1, n_steps=4, precision=precision),
                               IntegratedGradients(model64).attribute(x64, target=1, n_steps=4), rtol=0, atol=0)


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', 'fp16'"):
        IntegratedGradients(RGBNet()).attribute(torch.rand(1, 3, 32, 32), target=0, precision="int8")
    with pytest.raises(ValueError, match="internal_batch_size"):
        Engine(RGBNet(), batch_size=0)


def test_cli_precision_flag(tmp_path):
    import cv2

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8))
    runner = CliRunner()
    ok = runner.invoke(cli, ["attribute", "--model", "centerpixel", "--method", "ig", "--steps", "2", "--precision",
                             "bf16", "--image", str(image), "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["attribute", "--model", "centerpixel", "--method", "occlusion", "--precision", "bf16",
                              "--image", str(image), "--out", str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "--precision does not apply" in bad.output
    wrong = runner.invoke(cli, ["attribute", "--model", "centerpixel", "--method", "ig", "--precision", "fp8",
                                "--image", str(image), "--out", str(tmp_path / "out3")])
    assert wrong.exit_code == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_cpu_inputs_is_placed_by_the_engine():
    model = RGBNet().cuda().eval()
    x = torch.rand(2, 3, 32, 32)
    got = IntegratedGradients(model).attribute(x, target=1, n_steps=4)
    assert got.device == x.device
    expected = IntegratedGradients(model.cpu()).attribute(x, target=1, n_steps=4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_engine_constants_are_the_only_batch_budgets():
    assert engine_module.CPU_BATCH_BYTES > 0 and engine_module.CUDA_BATCH_BYTES > engine_module.CPU_BATCH_BYTES
    package = Path(fastig.__file__).parent
    budgets = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if "_BATCH_BYTES = " in p.read_text()]
    assert budgets == ["core/engine.py"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precision_close_to_fp32(precision):
    torch.manual_seed(0)
    model = RGBNet().cuda().eval()
    x = torch.rand(2, 3, 32, 32, device="cuda")
    exact = IntegratedGradients(model).attribute(x, target=[1, 2], n_steps=8)
    low = IntegratedGradients(model).attribute(x, target=[1, 2], n_steps=8, precision=precision)
    assert low.dtype == torch.float32
    assert 0 < ((low - exact).norm() / exact.norm()).item() < 0.15
