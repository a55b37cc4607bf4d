"""DeepLift: Captum's numbers where Captum applies its rules, a float64 reference, and the cases Captum gets wrong."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import DeepLiftShap as CaptumDeepLiftShap
from torch import nn

from fastig import methods, models
from fastig.api import attribute
from fastig.attr.deeplift import SUPPORTED_NON_LINEAR, DeepLift, DeepLiftShap
from fastig.attr.gradients import default_baseline_distribution

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


def warnings_off(method):
    """Captum warns about the hooks it sets on every call."""
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return method(*args, **kwargs)
    return call


def captum(model, *args, **kwargs):
    return warnings_off(CaptumDeepLift(model).attribute)(*args, **kwargs)


def small_cnn(act=nn.ReLU, pool=None, softmax=False, separate=True):
    """Conv-BN-act-[sep]-pool-Conv-act-AvgPool-Linear. ``separate`` puts an identity AvgPool2d(1) between the
    activation and the max pool so that no two of Captum's hooked modules touch (see test_adjacent_modules)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), act()]
    layers += [nn.AvgPool2d(1)] if separate else []
    layers += [pool or nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), act(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 10)]
    layers += [nn.Softmax(dim=1)] if softmax else []
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # BatchNorm in eval mode with non-trivial statistics
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Softplus])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_captum_on_small_cnns(act, n):
    model = small_cnn(act)
    torch.manual_seed(n)
    x, b = torch.randn(n, 3, 8, 8), 0.1 * torch.randn(n, 3, 8, 8)
    expected, expected_delta = captum(model, x, b, target=2, return_convergence_delta=True)
    got, delta = DeepLift(model).attribute(x, b, target=2, return_convergence_delta=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-4)


def maxpool_reference(conv, pool, head, x, b):
    """DeepLift on head(pool(conv(x))) written out with loops in float64: Captum's max-pool rule (the input's max
    position of each window gets ``w * (max(o, o_ref) - o_ref)``, the baseline's ``w * (o - max(o, o_ref))``)
    with the credits of every window added, divided by the pool input's difference from its reference."""
    conv, w = copy.deepcopy(conv).double(), head.weight.double()[0]
    x64, b64 = x.double().requires_grad_(), b.double()
    z, zr = conv(x64).detach(), conv(b64)
    (_, channels, h, wd), k, s, p = z.shape, pool.kernel_size, pool.stride, pool.padding
    out_h, out_w = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    credit = torch.zeros_like(z)
    for e, ch, oy, ox in itertools.product(range(z.shape[0]), range(channels), range(out_h), range(out_w)):
        cells = [(r, q) for r in range(max(0, oy * s - p), min(h, oy * s - p + k))
                 for q in range(max(0, ox * s - p), min(wd, ox * s - p + k))]
        at_input = max(cells, key=lambda rc: z[e, ch, rc[0], rc[1]])
        at_baseline = max(cells, key=lambda rc: zr[e, ch, rc[0], rc[1]])
        o, o_ref = z[e, ch][at_input], zr[e, ch][at_baseline]
        weight = w[(ch * out_h + oy) * out_w + ox]
        credit[e, ch][at_input] += weight * (torch.maximum(o, o_ref) - o_ref)
        credit[e, ch][at_baseline] += weight * (o - torch.maximum(o, o_ref))
    (grad,) = torch.autograd.grad(conv(x64), x64, credit / (z - zr))
    return (x64 - b64).detach() * grad


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1)],
                         ids=["2x2", "3x3-stride2-overlap", "3x3-stride1-overlap"])
def test_maxpool_rule_matches_loop_reference_and_sums_to_delta(pool):
    # Overlapping windows: a position that is the max of several windows gets all their credits, so the
    # attributions sum to f(x) - f(b). Captum unpools and keeps one credit per position: its delta is off there.
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x, b = torch.randn(2, 2, 8, 8), 0.1 * torch.randn(2, 2, 8, 8)
    head = nn.Linear(pool(conv(x)).flatten(1).shape[1], 1)
    model = nn.Sequential(conv, pool, nn.Flatten(), head)
    got, delta = DeepLift(model).attribute(x, b, target=0, return_convergence_delta=True)
    torch.testing.assert_close(got.double(), maxpool_reference(conv, pool, head, x, b), atol=1e-5, rtol=1e-4)
    f = (model(x) - model(b))[:, 0].detach()
    assert delta.abs().max() < 1e-5 * max(1.0, f.abs().max().item())
    expected, captum_delta = captum(model, x, b, target=0, return_convergence_delta=True)
    if pool.kernel_size <= pool.stride:  # no overlap: Captum's rule is the same rule
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    else:
        assert captum_delta.abs().max() > 1e-3 * f.abs().max()  # documents the credits Captum drops


@pytest.mark.parametrize("baselines", [None, 0.5, "batch1"])
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_matches_captum_targets_baselines_and_flags(baselines, multiply_by_inputs):
    model = small_cnn()
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    if baselines == "batch1":
        baselines = torch.randn(1, 3, 8, 8)
    target = [0, 3, 9, 3]
    expected = CaptumDeepLift(model, multiply_by_inputs=multiply_by_inputs).attribute(x, baselines, target=target)
    got = DeepLift(model, multiply_by_inputs=multiply_by_inputs).attribute(x, baselines, target=target)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu, self.sig = nn.Linear(5, 4), nn.Linear(3, 4), nn.ReLU(), nn.Sigmoid()
        self.out = nn.Linear(4, 3)

    def forward(self, x, y, scale):
        return self.out(self.relu(self.a(x)) * scale + self.sig(self.b(y)))


def test_tuple_inputs_additional_args_and_custom_function():
    torch.manual_seed(4)
    model = TwoInputs()
    x, y = torch.randn(3, 5), torch.randn(3, 3)
    scale = torch.rand(3, 1) + 0.5
    custom = lambda m, inputs, baselines: tuple(g * (i - b) ** 2 for g, i, b in zip(m, inputs, baselines))  # noqa
    for kwargs in ({}, {"custom_attribution_func": custom}):
        expected = captum(model, (x, y), (0.1, torch.ones(1, 3)), target=1, additional_forward_args=scale, **kwargs)
        got = DeepLift(model).attribute((x, y), (0.1, torch.ones(1, 3)), target=1, additional_forward_args=scale,
                                        **kwargs)
        assert isinstance(got, tuple) and len(got) == 2
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_softmax_single_example_matches_captum_and_batch_is_per_example():
    model = small_cnn(softmax=True)
    torch.manual_seed(5)
    x, b = torch.randn(3, 3, 8, 8), torch.zeros(3, 3, 8, 8)
    fastig = DeepLift(model)
    torch.testing.assert_close(fastig.attribute(x[:1], b[:1], target=4), captum(model, x[:1], b[:1], target=4),
                               atol=1e-7, rtol=1e-5)
    # Captum centers the softmax multipliers over the whole batch; fastig per example, so a batch gives each
    # example's single-example attribution
    batch = fastig.attribute(x, b, target=4)
    single = torch.cat([fastig.attribute(x[i:i + 1], b[i:i + 1], target=4) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-7, rtol=1e-5)


def deeplift_reference_mlp(layers, x, b, target):
    """Rescale rule on Linear-ReLU-Linear-Sigmoid-Linear written out by hand in float64 (no autograd)."""
    (w1, b1), (w2, b2), (w3, b3) = [(l.weight.double(), l.bias.double()) for l in layers]
    x, b = x.double(), b.double()
    z1, z1r = x @ w1.T + b1, b @ w1.T + b1
    a1, a1r = z1.relu(), z1r.relu()
    z2, z2r = a1 @ w2.T + b2, a1r @ w2.T + b2
    a2, a2r = z2.sigmoid(), z2r.sigmoid()
    m2 = (a2 - a2r) / (z2 - z2r)  # no ties with random data
    m1 = (a1 - a1r) / (z1 - z1r)
    multipliers = ((w3[target] * m2) @ w2 * m1) @ w1
    return (x - b) * multipliers, (a2 @ w3.T + b3)[:, target] - (a2r @ w3.T + b3)[:, target]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5])
def test_matches_float64_reference(dtype, n):
    torch.manual_seed(6 + n)
    layers = [nn.Linear(7, 6), nn.Linear(6, 5), nn.Linear(5, 3)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.Sigmoid(), layers[2]).to(dtype)
    x, b = torch.randn(n, 7, dtype=dtype), torch.randn(n, 7, dtype=dtype)
    expected, f_diff = deeplift_reference_mlp(layers, x, b, 2)
    got, delta = DeepLift(model).attribute(x, b, target=2, return_convergence_delta=True)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    # summation-to-delta holds for this rule: the delta is rounding only
    torch.testing.assert_close(got.double().sum(1), f_diff, atol=10 * tol, rtol=10 * tol)
    assert delta.abs().max() < 10 * tol * max(1.0, f_diff.abs().max().item())


def test_eps_threshold_uses_ordinary_gradient():
    # A ReLU whose input equals its baseline input gets its ordinary gradient (eps rule), so the zero-width unit
    # still passes gradient where its pre-activation is positive; with a huge eps every unit does.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[2.0, 3.0]]))
    x, b = torch.tensor([[1.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    for eps in (1e-10, 10.0):
        got = DeepLift(model, multiply_by_inputs=False, eps=eps).attribute(x, b)
        expected = CaptumDeepLift(model, multiply_by_inputs=False, eps=eps).attribute(x, b)
        torch.testing.assert_close(got, expected)
    # eps = 1e-10: unit 0 rescaled ((1 - 0) / (1 - -1) = 0.5 -> 2 * 0.5), unit 1 tied: its gradient at -1 is 0
    torch.testing.assert_close(DeepLift(model, multiply_by_inputs=False).attribute(x, b), torch.tensor([[1.0, 0.0]]))
    # eps = 10: ordinary gradient for both units: relu'(1) = 1 and relu'(-1) = 0
    torch.testing.assert_close(DeepLift(model, multiply_by_inputs=False, eps=10.0).attribute(x, b),
                               torch.tensor([[2.0, 0.0]]))


def test_adjacent_modules_captum_loses_the_sum_fastig_keeps_it():
    # ReLU output straight into MaxPool: Captum's ReLU hook reads the gradient before the max-pool hook replaces
    # it. fastig's numbers equal Captum's on the same model with an identity layer in between (where Captum's
    # rules work), and its sum of attributions matches f(x) - f(b).
    adjacent, separated = small_cnn(separate=False), small_cnn(separate=True)
    torch.manual_seed(8)
    x, b = torch.randn(2, 3, 8, 8), 0.1 * torch.randn(2, 3, 8, 8)
    got, delta = DeepLift(adjacent).attribute(x, b, target=1, return_convergence_delta=True)
    torch.testing.assert_close(got, captum(separated, x, b, target=1), atol=1e-6, rtol=1e-5)
    assert delta.abs().max() < 1e-5
    _, captum_delta = captum(adjacent, x, b, target=1, return_convergence_delta=True)
    assert captum_delta.abs().max() > 1e-4  # documents the Captum behaviour fastig avoids
    # the other order, a max pool straight into a ReLU: Captum's pool reads the ReLU's plain gradient
    torch.manual_seed(9)
    conv, head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 3)
    pool_relu = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), head)
    separated = nn.Sequential(conv, nn.MaxPool2d(2), nn.AvgPool2d(1), nn.ReLU(), nn.Flatten(), head)
    got, delta = DeepLift(pool_relu).attribute(x, b, target=1, return_convergence_delta=True)
    torch.testing.assert_close(got, captum(separated, x, b, target=1), atol=1e-6, rtol=1e-5)
    assert delta.abs().max() < 1e-5
    assert captum(pool_relu, x, b, target=1, return_convergence_delta=True)[1].abs().max() > 1e-4


class ReusedReluBlock(nn.Module):
    """A residual block calling one nn.ReLU(inplace=True) twice, as torchvision's BasicBlock does."""

    def __init__(self, distinct=False):
        super().__init__()
        torch.manual_seed(9)
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True) if distinct else self.relu
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        return self.head(self.relu2(out + x).flatten(1))


def test_reused_module_is_handled_where_captum_fails():
    torch.manual_seed(10)
    x, b = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match="used more than once"):
        captum(ReusedReluBlock(), x, b, target=0)
    expected = captum(ReusedReluBlock(distinct=True), x, b, target=0)
    got, delta = DeepLift(ReusedReluBlock()).attribute(x, b, target=0, return_convergence_delta=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert delta.abs().max() < 1e-5


class CaptumFriendlyResNet(nn.Module):
    """The same weights as a fastig ResNet-18, run with a distinct ReLU per call and an identity layer between
    the stem's ReLU and max pool: the model Captum needs to apply its rules as documented."""

    def __init__(self, resnet):
        super().__init__()
        self.net = resnet
        self.stem_relu, self.separator = nn.ReLU(), nn.AvgPool2d(1)
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(16))

    def forward(self, x):
        net, relus = self.net, iter(self.relus)
        x = net.maxpool(self.separator(self.stem_relu(net.bn1(net.conv1(x)))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                identity = x if block.downsample is None else block.downsample(x)
                out = block.bn2(block.conv2(next(relus)(block.bn1(block.conv1(x)))))
                x = next(relus)(out + identity)
        return net.fc(torch.flatten(net.avgpool(x), 1))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(11)
    model = models.get("resnet18", weights="none").eval()
    with torch.no_grad():  # random BatchNorm statistics, so that eval mode is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_resnet18_matches_captum_on_the_captum_friendly_copy(resnet18):
    torch.manual_seed(12)
    x, b = torch.randn(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)
    with pytest.raises(RuntimeError):  # Captum cannot run the stock model (one ReLU per block, called twice)
        captum(resnet18, x, b, target=7)
    # the stem's overlapping 3x3 stride-2 max pool sums to delta here, and not in Captum
    got, delta = DeepLift(resnet18).attribute(x, b, target=7, return_convergence_delta=True)
    f = resnet18(x)[:, 7] - resnet18(b)[:, 7]
    assert delta.abs().max() < 1e-4 * max(1.0, f.abs().max().item())
    # with a non-overlapping stem pool (same output size), every rule is Captum's: the numbers agree
    stem_2x2 = copy.deepcopy(resnet18)
    stem_2x2.maxpool = nn.MaxPool2d(2)
    expected, expected_delta = captum(CaptumFriendlyResNet(stem_2x2), x, b, target=7, return_convergence_delta=True)
    got, delta = DeepLift(stem_2x2).attribute(x, b, target=7, return_convergence_delta=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta, expected_delta, atol=1e-4, rtol=1e-3)


def test_model_is_restored_and_works_in_float64():
    model = small_cnn().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    with pytest.raises(ValueError):
        DeepLift(model).attribute(x, torch.zeros(3, 3, 8, 8, dtype=torch.float64), target=0)
    DeepLift(model).attribute(x, target=0)
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(model(x), before)
    assert SUPPORTED_NON_LINEAR  # the rule table is public for documentation


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        DeepLift(lambda x: x)
    with pytest.raises(ValueError, match="eps"):
        DeepLift(small_cnn(), eps=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        DeepLift(small_cnn()).attribute(torch.zeros(1, 3, 8, 8, dtype=torch.long), target=0)
    with pytest.raises(ValueError, match="1 to 3 arguments"):
        DeepLift(small_cnn()).attribute(torch.randn(1, 3, 8, 8), target=0,
                                        custom_attribution_func=lambda a, b, c, d: a)


def test_centerpixel_ranks_the_center_pixel_first():
    # The model is relu(W x + b) with every logit >= 1 on [0, 1] inputs (ReLU is the identity for the input and
    # the all-zero baseline alike), so the Rescale multipliers are exactly W[c] and DeepLift = x * W[c]: the
    # center pixel gets 510 * c * x_center ~= 2 c^2 and every other pixel x_p / 227^2 <= 2e-5. For a class
    # c >= 1 the center pixel must rank first; for c = 0 its weight is 0 and nothing singles it out.
    model = models.get("centerpixel", weights="none")
    torch.manual_seed(13)
    x = torch.rand(3, 1, 227, 227)
    x[:, 0, 113, 113] = torch.tensor([1 / 255, 0.5, 1.0])
    target = model(x).argmax(1)
    attributions = DeepLift(model).attribute(x, target=target)
    center = 113 * 227 + 113
    assert (attributions.flatten(1).argmax(1) == center).all()
    expected = x.flatten(1) * model.linear.weight[target]
    torch.testing.assert_close(attributions.flatten(1), expected, atol=1e-6, rtol=1e-5)


def test_compute_convergence_delta_and_forward_func_match_captum():
    model = small_cnn()
    torch.manual_seed(14)
    x, b = torch.randn(3, 3, 8, 8), 0.1 * torch.randn(3, 3, 8, 8)
    fastig = DeepLift(model)
    assert fastig.forward_func is model and CaptumDeepLift(model).forward_func is model
    attributions, delta = fastig.attribute(x, b, target=[1, 4, 2], return_convergence_delta=True)
    for start in (b, 0.0):
        expected = CaptumDeepLift(model).compute_convergence_delta(attributions, start, x, target=[1, 4, 2])
        got = fastig.compute_convergence_delta(attributions, start, x, target=[1, 4, 2])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fastig.compute_convergence_delta(attributions, b, x, target=[1, 4, 2]), delta,
                               atol=1e-5, rtol=1e-4)  # the joint pass's delta is the same quantity


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_deeplift_shap_matches_captum(multiply_by_inputs):
    model = small_cnn()
    torch.manual_seed(15)
    x, distribution = torch.randn(2, 3, 8, 8), 0.2 * torch.randn(3, 3, 8, 8)
    expected, expected_delta = warnings_off(CaptumDeepLiftShap(model, multiply_by_inputs).attribute)(
        x, distribution, target=[3, 1], return_convergence_delta=True)
    got, delta = DeepLiftShap(model, multiply_by_inputs).attribute(x, distribution, target=[3, 1],
                                                                    return_convergence_delta=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-4)
    assert delta.shape == (6,)  # one per (example, baseline) pair, as in Captum
    # chunked joint passes, a callable distribution: the same numbers
    chunked = DeepLiftShap(model, multiply_by_inputs).attribute(x, lambda: distribution, target=[3, 1],
                                                                internal_batch_size=4)
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=1e-5)


def test_deeplift_shap_tuple_inputs_and_errors():
    torch.manual_seed(16)
    model = TwoInputs()
    x, y, scale = torch.randn(2, 5), torch.randn(2, 3), torch.rand(2, 1) + 0.5
    distribution = (torch.randn(4, 5), torch.randn(4, 3))
    # (Captum's DeepLiftShap needs extra arguments as a tuple; fastig takes them either way)
    expected = warnings_off(CaptumDeepLiftShap(model).attribute)((x, y), distribution, target=2,
                                                                 additional_forward_args=(scale,))
    got = DeepLiftShap(model).attribute((x, y), distribution, target=2, additional_forward_args=scale)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    for bad in (distribution[0][:1], 0.5):  # Captum asserts a tensor of more than one baseline
        with pytest.raises(AssertionError):
            warnings_off(CaptumDeepLiftShap(nn.Sequential(nn.Linear(5, 2))).attribute)(x, bad, target=0)
        with pytest.raises(AssertionError, match="baseline"):
            DeepLiftShap(nn.Sequential(nn.Linear(5, 2))).attribute(x, bad, target=0)


def test_registered_deeplift_shap_is_captums_against_the_cli_baselines():
    # `fastig attribute --method deeplift_shap`: DeepLiftShap against zeros and the fixed uniform-noise image
    model = small_cnn()
    torch.manual_seed(17)
    x = torch.randn(2, 3, 8, 8)
    got = attribute(model, x, target=1, method="deeplift_shap", **methods.get("deeplift_shap").demo)
    expected = warnings_off(CaptumDeepLiftShap(model).attribute)(x, default_baseline_distribution(x), target=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
