"""Insecurity maps: equal to a plain per-image, per-class, per-pair reference written from the released code's
procedure (numpy, cv2.resize, one backward per class; 2ndG by one backward per channel and position) for every
attribution x difficulty; the top insecurity of a toy model lies in the region its two classes share; cs and
entropy match their closed forms; the hardness predictor learns a synthetic difficulty."""

import cv2
import numpy as np
import pytest
import torch

from fastig.deliberative import (HardnessPredictor, InsecurityMaps, ambiguous_pairs, confidence_difficulty,
                                 entropy_difficulty, load_hardness, save_hardness, top_fraction_mask, train_hardness)
from fastig.deliberative.hardness import HardnessHead, hardness_loss
from fastig.errors import CheckpointError


class Net(torch.nn.Module):
    """conv -> ReLU -> conv -> Softplus (the explained layer ``act``, 4 channels at 5x5) -> linear, 7 classes."""

    def __init__(self, classes=7):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 5, 3, stride=2)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(5, 4, 3, padding=1)
        self.act = torch.nn.Softplus()
        self.fc = torch.nn.Linear(4 * 5 * 5, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv2(self.relu(self.conv1(x)))), 1))


def hardness_for(model):
    torch.manual_seed(3)
    hp = HardnessPredictor.from_classifier(model, hidden=8, widths=(6, 5))
    for m in hp.head.modules():  # non-trivial BatchNorm statistics, so eval mode is not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return hp.double().eval()


# --- the reference: the released code's procedure, one image, one class, one pair at a time -----------------


def _forward_with_layer(module, layer, x):
    store = {}

    def hook(_m, _i, out):
        store["a"] = out
        out.retain_grad()

    handle = layer.register_forward_hook(hook)
    out = module(x)
    handle.remove()
    return store["a"], out


def _grad_at_layer(module, layer, x, score_of_output):
    a, out = _forward_with_layer(module, layer, x)
    (g,) = torch.autograd.grad(score_of_output(out), a)
    return a.detach()[0].numpy(), g[0].numpy()


def reference(model, hp, kind, attribution, x, top_k=5, steps=4):
    """Per-image reference. Returns (classes, difficulty score, class maps [h, w, K], difficulty map, pairs of
    rank indices, insecurity maps [P, H, W])."""
    layer = model.act
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[0].numpy()
    classes = np.argsort(probs)[-top_k:][::-1]
    if kind == "hp":
        d_module, d_layer, d_score = hp, hp.trunk.act, (lambda out: out[0])
        with torch.no_grad():
            score = float(hp(x)[0])
    else:
        d_module, d_layer = model, layer
        if kind == "cs":
            d_score = lambda out: 1 - torch.softmax(out, 1).max()
            score = 1 - probs.max()
        else:
            d_score = lambda out: -(torch.softmax(out, 1) * torch.log_softmax(out, 1)).sum() / np.log(out.shape[1])
            score = -(probs * np.log(probs)).sum() / np.log(len(probs))

    if attribution == "ig":
        baseline = torch.zeros_like(x)
        points = [baseline + (i / steps) * (x - baseline) for i in range(steps + 1)]
        a1 = _grad_at_layer(model, layer, x, lambda out: out[0, 0])[0]
        a0 = _grad_at_layer(model, layer, baseline, lambda out: out[0, 0])[0]
        maps = []
        for c in classes:
            mean_g = np.mean([_grad_at_layer(model, layer, p, lambda out: out[0, c])[1] for p in points], 0)
            maps.append(((a1 - a0) * mean_g).sum(0))
        d1 = _grad_at_layer(d_module, d_layer, x, d_score)[0]
        d0 = _grad_at_layer(d_module, d_layer, baseline, d_score)[0]
        mean_g = np.mean([_grad_at_layer(d_module, d_layer, p, d_score)[1] for p in points], 0)
        prod = (d1 - d0) * mean_g
        prod[prod < 0] = 1e-100
        difficulty = prod.sum(0)
    else:
        maps = []
        for c in classes:
            a, g = _grad_at_layer(model, layer, x, lambda out: out[0, c])
            maps.append((a * g).sum(0))
        a, g = _grad_at_layer(d_module, d_layer, x, d_score)
        difficulty = (a * np.maximum(g, 0)).sum(0)
        if attribution == "2ndg":  # one backward per channel and position builds each H_pp (the released code)
            acts, out = _forward_with_layer(d_module, d_layer, x)
            (grad,) = torch.autograd.grad(d_score(out), acts, create_graph=True)
            c_, h, w = acts.shape[1:]
            second = np.zeros((h, w))
            for i in range(h):
                for j in range(w):
                    block = np.stack([torch.autograd.grad(grad[0, d, i, j], acts, retain_graph=True)[0][0, :, i, j]
                                      .numpy() for d in range(c_)])
                    v = acts[0, :, i, j].detach().numpy()
                    second[i, j] = v @ block @ v
            difficulty = difficulty + np.abs(second) / 2.0
    class_maps = np.stack(maps, axis=2)
    class_maps[class_maps < 0] = 1e-7

    confusion = np.sort(np.argsort(class_maps, axis=2)[:, :, -3:], axis=2)
    pairs = np.zeros((1, 2))
    for i in range(3):
        for j in range(i + 1, 3):
            pairs = np.concatenate([pairs, np.stack([confusion[:, :, i].reshape(-1), confusion[:, :, j].reshape(-1)], 1)])
    pairs = np.unique(pairs, axis=0)
    pairs = pairs[~np.all(pairs == 0, axis=1)].astype(int)
    size = x.shape[2:]
    insecurity = np.stack([cv2.resize(class_maps[:, :, a] * class_maps[:, :, b] * difficulty, (size[1], size[0]))
                           for a, b in pairs])
    return classes, score, class_maps, difficulty, pairs, insecurity


def reference_mask(insecurity, r):
    threshold = np.sort(insecurity.flatten())[int(-r * insecurity.size)]
    return insecurity > threshold


@pytest.mark.parametrize("attribution", ["gradient", "ig", "2ndg"])
@pytest.mark.parametrize("kind", ["hp", "cs", "entropy"])
def test_equals_the_per_class_reference(attribution, kind):
    torch.manual_seed(0)
    model = Net().double().eval()
    hp = hardness_for(model)
    x = torch.randn(3, 3, 11, 11, dtype=torch.float64)
    maps = InsecurityMaps(model, "act", attribution=attribution, difficulty=kind, hardness_predictor=hp, ig_steps=4)
    results = maps.attribute(x, batch_size=2)
    assert len(results) == 3
    for i, result in enumerate(results):
        classes, score, class_maps, difficulty, pairs, insecurity = reference(model, hp, kind, attribution, x[i:i + 1])
        assert result.classes.tolist() == classes.tolist()
        assert result.difficulty == pytest.approx(score, rel=1e-10)
        np.testing.assert_allclose(result.class_maps.permute(1, 2, 0).numpy(), class_maps, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.difficulty_map.numpy(), difficulty, rtol=1e-9, atol=1e-12)
        assert result.pair_ranks.tolist() == pairs.tolist()
        assert result.pairs.tolist() == classes[pairs].tolist()
        np.testing.assert_allclose(result.maps.numpy(), insecurity, rtol=1e-7, atol=1e-12 * np.abs(insecurity).max())
        for r in (0.05, 0.3, 0.77):
            assert np.array_equal(result.masks(r).numpy(), np.stack([reference_mask(m, r) for m in insecurity]))
    assert np.abs(results[0].difficulty_map.numpy()).max() > 0


def test_float32_and_batching():
    model = Net().eval()
    x = torch.randn(5, 3, 11, 11)
    maps = InsecurityMaps(model, model.act, attribution="gradient", difficulty="cs")
    one = maps.attribute(x, batch_size=1)
    all_ = maps.attribute(x)
    for a, b in zip(one, all_):
        assert torch.equal(a.pairs, b.pairs)
        torch.testing.assert_close(a.maps, b.maps, rtol=1e-5, atol=1e-6 * float(b.maps.abs().max()))


class SharedRegionNet(torch.nn.Module):
    """One channel of |x| pooled to 6x6 (the layer ``act``); class A sums the region ``shared`` and ``only_a``,
    class B ``shared`` and ``only_b``, class C is a small constant-free sum elsewhere; the class-specific regions
    are the brighter ones."""

    def __init__(self, shared, only_a, only_b):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(2)
        self.act = torch.nn.Softplus(beta=20)
        weights = torch.zeros(4, 36)
        for cls, regions in enumerate([(shared, only_a), (shared, only_b), (), ()]):
            for region in regions:
                weights[cls, region] = 1.0
        weights[2, :] = 0.05
        weights[3, :] = 0.04
        self.register_buffer("weights", weights)

    def forward(self, x):
        return torch.flatten(self.act(self.pool(x.abs())), 1) @ self.weights.T


def shared_region_example(shared, only_a, only_b):
    """The toy model, a 12x12 image (background 0.2, the shared cells 1.0, the class-specific cells 3.0) and a
    hardness predictor whose difficulty rises with every class score (so its map is positive everywhere)."""
    model = SharedRegionNet(shared, only_a, only_b).eval()
    x = torch.full((1, 1, 12, 12), 0.2)
    cells = x[0, 0].reshape(6, 2, 6, 2)
    for cell, value in [(c, 1.0) for c in shared] + [(c, 3.0) for c in only_a + only_b]:
        cells[cell // 6, :, cell % 6, :] = value
    head = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid(), torch.nn.Flatten(0))
    torch.nn.init.constant_(head[0].weight, 0.1)
    return model, x, HardnessPredictor(model, head).eval()


@pytest.mark.parametrize("attribution", ["gradient", "ig", "2ndg"])
def test_top_insecurity_lies_in_the_shared_region(attribution):
    shared, only_a, only_b = [0, 1, 6, 7], [28, 29, 34, 35], [4, 5, 10, 11]
    model, x, hp = shared_region_example(shared, only_a, only_b)
    result = InsecurityMaps(model, "act", attribution=attribution, difficulty="hp", hardness_predictor=hp,
                            top_k=4, ig_steps=8).attribute(x)[0]
    pair = result.pairs.tolist().index(sorted([0, 1], key=lambda c: result.classes.tolist().index(c)))
    top = result.masks(0.1)[pair]
    in_shared = torch.zeros(6, 6, dtype=torch.bool)
    for cell in shared:
        in_shared[cell // 6, cell % 6] = True
    in_shared = in_shared.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert top.any() and in_shared[top].all()
    peak = torch.nonzero(result.maps[pair] == result.maps[pair].max())[0]
    assert in_shared[peak[0], peak[1]]


def test_closed_forms_of_cs_and_entropy():
    logits = torch.randn(6, 9, dtype=torch.float64) * 3
    p = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(confidence_difficulty(logits).numpy(), 1 - p.max(1), rtol=1e-12)
    np.testing.assert_allclose(entropy_difficulty(logits).numpy(), -(p * np.log(p)).sum(1) / np.log(9), rtol=1e-12)
    uniform = torch.zeros(2, 9)
    torch.testing.assert_close(entropy_difficulty(uniform), torch.ones(2))
    torch.testing.assert_close(confidence_difficulty(uniform), torch.full((2,), 1 - 1 / 9))
    certain = torch.tensor([[100.0, 0, 0]])
    assert float(entropy_difficulty(certain)) < 1e-6 and float(confidence_difficulty(certain)) < 1e-6


def test_pairs_and_masks_follow_numpy_with_ties():
    class_maps = torch.tensor([[[1e-7, 2.0], [3.0, 1e-7]], [[1e-7, 1.0], [3.0, 0.5]], [[1e-7, 5.0], [1.0, 1e-7]],
                               [[1e-7, 1e-7], [0.0, 1e-7]], [[1e-7, 0.0], [2.0, 1e-7]]], dtype=torch.float64)
    top3 = np.sort(np.argsort(class_maps.permute(1, 2, 0).numpy(), axis=2)[:, :, -3:], axis=2).reshape(-1, 3)
    expected = np.unique(np.concatenate([top3[:, [0, 1]], top3[:, [0, 2]], top3[:, [1, 2]]]), axis=0)
    assert ambiguous_pairs(class_maps).tolist() == expected.tolist()
    maps = torch.randint(0, 6, (3, 9, 7)).double()  # many ties
    for r in (0.2, 0.5, 0.9):
        assert np.array_equal(top_fraction_mask(maps, r).numpy(), np.stack([reference_mask(m.numpy(), r) for m in maps]))
    assert not top_fraction_mask(maps, 0.01).any()  # less than one position: empty (the released code keeps all)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(maps, 1.0)


def test_bad_arguments():
    model = Net().eval()
    with pytest.raises(ValueError, match="attribution"):
        InsecurityMaps(model, "act", attribution="lrp", difficulty="cs")
    with pytest.raises(ValueError, match="difficulty"):
        InsecurityMaps(model, "act", difficulty="margin")
    with pytest.raises(ValueError, match="hardness_predictor"):
        InsecurityMaps(model, "act", difficulty="hp")
    with pytest.raises(ValueError, match="no submodule"):
        InsecurityMaps(model, "features.42", difficulty="cs")
    with pytest.raises(ValueError, match="top_k"):
        InsecurityMaps(model, "act", difficulty="cs", top_k=8).attribute(torch.randn(1, 3, 11, 11))
    with pytest.raises(ValueError, match="images"):
        InsecurityMaps(model, "act", difficulty="cs").attribute(torch.randn(3, 11, 11))


# --- hardness predictor --------------------------------------------------------------------------------------


class TinyClassifier(torch.nn.Module):
    """Two classes from the sign of (left half - right half) of a 1x8x8 image; sharp (logit 12 x difference)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(4 * 64, 2)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def synthetic_task(n, generator):
    """Images whose class is the sign of s (left half +s, right half -s, plus noise); for |s| < 0.25 the label is a
    coin flip, so those examples are hard: the classifier is wrong on half of them."""
    s = torch.rand(n, generator=generator) * 2 - 1
    x = torch.randn(n, 1, 8, 8, generator=generator) * 0.05
    x[:, :, :, :4] += s.reshape(-1, 1, 1, 1)
    x[:, :, :, 4:] -= s.reshape(-1, 1, 1, 1)
    labels = (s > 0).long()
    ambiguous = s.abs() < 0.25
    flips = torch.rand(n, generator=generator) < 0.5
    labels[ambiguous & flips] = 1 - labels[ambiguous & flips]
    return x, labels, ambiguous


def test_hardness_predictor_learns_a_known_difficulty(tmp_path):
    torch.manual_seed(0)
    classifier = TinyClassifier().eval()
    with torch.no_grad():  # a classifier that reads the sign of left - right exactly
        classifier.features[0].weight.zero_()
        classifier.features[0].bias.zero_()
        classifier.features[0].weight[0, 0, 1, 1] = 1.0
        classifier.features[0].weight[1, 0, 1, 1] = -1.0
        w = torch.zeros(2, 4, 8, 8)
        w[1, 0, :, :4], w[1, 1, :, 4:], w[0, 1, :, :4], w[0, 0, :, 4:] = 1.0, 1.0, 1.0, 1.0
        classifier.classifier.weight.copy_(w.reshape(2, -1) * 0.4)
        classifier.classifier.bias.zero_()
    generator = torch.Generator().manual_seed(1)
    x, labels, ambiguous = synthetic_task(768, generator)
    predictor = HardnessPredictor.from_classifier(classifier, hidden=16, widths=(32, 16))
    batches = [(x[i:i + 96], labels[i:i + 96]) for i in range(0, 768, 96)]
    history = train_hardness(classifier, predictor, batches, epochs=8, lr=5e-3, weight_decay=0.0)
    assert history[-1] < history[0]
    x_test, _, hard = synthetic_task(512, generator)
    with torch.no_grad():
        scores = predictor(x_test)
    # AUROC of the predicted difficulty for the truly ambiguous examples
    ranks = torch.argsort(torch.argsort(scores)).double()
    auroc = (ranks[hard].sum() - hard.sum() * (hard.sum() - 1) / 2) / (hard.sum() * (~hard).sum())
    assert auroc > 0.9, auroc
    assert scores[hard].mean() > scores[~hard].mean() + 0.15

    path = tmp_path / "hp.pt"
    save_hardness(predictor, path)
    loaded = load_hardness(path, TinyClassifier())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), scores)
    torch.save({"trunk.x": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a hardness predictor"):
        load_hardness(tmp_path / "bad.pt", TinyClassifier())
    torch.save({"head.bn1.weight": torch.zeros(16), "head.fc1.weight": torch.zeros(32, 16),
                "head.fc2.weight": torch.zeros(16, 32)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing key"):
        load_hardness(tmp_path / "partial.pt", TinyClassifier())


def test_hardness_architecture_and_loss():
    classifier = TinyClassifier()
    hp = HardnessPredictor.from_classifier(classifier)
    assert hp.trunk.classifier.out_features == 1000 and isinstance(hp.head, HardnessHead)
    assert classifier.classifier.out_features == 2  # the classifier itself is untouched
    torch.testing.assert_close(hp.trunk.features[0].weight, classifier.features[0].weight)
    assert [n for n, _ in hp.head.named_children()] == ["bn1", "fc1", "bn2", "fc2", "bn3", "fc3", "dropout"]
    assert hp.eval()(torch.randn(3, 1, 8, 8)).shape == (3,)
    s, p = torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1])
    torch.testing.assert_close(hardness_loss(s, p), torch.tensor(((1 - 0.3 * 0.2 - 0.8 * 0.7) + (1 - 0.9 * 0.9 - 0.1 * 0.1)) / 2))
    with pytest.raises(ValueError, match="nn.Linear"):
        HardnessPredictor.from_classifier(torch.nn.Conv2d(1, 1, 1))
