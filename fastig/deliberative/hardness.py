"""The hardness predictor (Wang & Vasconcelos, "Towards Realistic Predictors", ECCV 2018), the ``hp`` difficulty
score of deliberative explanations.

Architecture, as the released code builds it: a *trunk* with the classifier's architecture, initialized from the
classifier's weights, whose last linear layer is replaced by a fresh one with ``hidden`` outputs (1000), and a
small *head* ``BN-ReLU-Dropout-FC(hidden, 1000)-BN-ReLU-Dropout-FC(1000, 100)-BN-ReLU-Dropout-FC(100, 1)-sigmoid``
(dropout 0.3; the module names ``bn1 fc1 bn2 fc2 bn3 fc3`` are the released code's). The output is the predicted
difficulty of the classifier on the image, in (0, 1).

Training (:func:`train_hardness`): the classifier is fixed (eval mode) and gives ``p``, its softmax probability of
the true class; the predictor's output ``s`` minimizes the released code's loss ``mean(1 - (1 - p) s - (1 - s) p)``
(``extra_setting.opposite_loss``), which pushes ``s`` towards 1 where ``p < 0.5`` and towards 0 elsewhere.
Adam, learning rate 1e-5, weight decay 1e-3 by default (the released code's settings). The released code trains
the classifier jointly, weighting its loss by ``s``; here the classifier being explained is given and stays fixed.

Checkpoints are plain state_dicts (``trunk.*``, ``head.*``), read with fastig's safe loader; the head's widths
are read from the file's shapes.
"""

from __future__ import annotations

import copy
import os
from typing import Iterable, Iterator

import torch
from torch import nn

from fastig.core import progress
from fastig.errors import CheckpointError, check_int
from fastig.models.checkpoints import apply_state_dict, read_state_dict

HIDDEN = 1000  # the trunk's new output width (the released code keeps ImageNet's 1000)
WIDTHS = (1000, 100)
DROPOUT = 0.3


class HardnessHead(nn.Module):
    """The released code's ``AHP_HP_RES50_PRESIGMOID`` head: [N, hidden] trunk outputs -> [N] difficulty in (0, 1)."""

    def __init__(self, in_features: int = HIDDEN, widths: tuple[int, int] = WIDTHS, dropout: float = DROPOUT):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(in_features)
        self.fc1 = nn.Linear(in_features, widths[0])
        self.bn2 = nn.BatchNorm1d(widths[0])
        self.fc2 = nn.Linear(widths[0], widths[1])
        self.bn3 = nn.BatchNorm1d(widths[1])
        self.fc3 = nn.Linear(widths[1], 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.dropout(torch.relu(self.bn1(z))))
        x = self.fc2(self.dropout(torch.relu(self.bn2(x))))
        x = self.fc3(self.dropout(torch.relu(self.bn3(x))))
        return torch.sigmoid(x).reshape(-1)


class HardnessPredictor(nn.Module):
    """``trunk`` (the classifier's architecture) then ``head``: images -> [N] predicted difficulty."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, *inputs) -> torch.Tensor:
        return self.head(self.trunk(*inputs))

    @classmethod
    def from_classifier(cls, classifier: nn.Module, hidden: int = HIDDEN, widths: tuple[int, int] = WIDTHS,
                        dropout: float = DROPOUT) -> "HardnessPredictor":
        """A predictor whose trunk is a copy of ``classifier`` (weights included) with its last linear layer
        replaced by a new ``Linear(in_features, hidden)``; the head is freshly initialized."""
        trunk = copy.deepcopy(classifier)
        name, last = _last_linear(trunk)
        parent = trunk.get_submodule(name.rpartition(".")[0]) if "." in name else trunk
        setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, hidden, bias=last.bias is not None))
        return cls(trunk, HardnessHead(hidden, widths, dropout))


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to turn into the hardness trunk's output")
    return linears[-1]


def hardness_loss(scores: torch.Tensor, p_true: torch.Tensor) -> torch.Tensor:
    """The released code's loss: ``mean(1 - (1 - p) s - (1 - s) p)`` for predicted difficulty ``s`` and the
    classifier's probability ``p`` of the true class."""
    return (1 - (1 - p_true) * scores - (1 - scores) * p_true).mean()


def train_hardness(classifier: nn.Module, predictor: HardnessPredictor,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epochs: int = 1, lr: float = 1e-5,
                   weight_decay: float = 1e-3) -> list[float]:
    """Train ``predictor`` on the fixed ``classifier``'s difficulty; returns the mean loss of each epoch.

    ``batches`` is re-iterated every epoch (a list, or an object whose ``__iter__`` reshuffles): batches of
    images [B, ...] and their true labels [B]. The classifier runs in eval mode without gradients; the predictor
    trains in train mode (BatchNorm, dropout) and is returned to eval mode. Progress is shown per batch.
    """
    check_int("epochs", epochs)
    classifier.eval()
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    with progress.task("hardness predictor", total=epochs, unit="epochs") as task:
        for _ in range(epochs):
            predictor.train()
            total, count = 0.0, 0
            for images, labels in _batches(batches):
                with torch.no_grad():
                    p_true = torch.softmax(classifier(images), 1).gather(1, labels.reshape(-1, 1)).reshape(-1)
                loss = hardness_loss(predictor(images), p_true)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.pulse()
                total, count = total + float(loss.detach()) * len(labels), count + len(labels)
            history.append(total / max(count, 1))
            task.advance()
    predictor.eval()
    return history


def _batches(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for item in batches:
        images, labels = item
        if images.shape[0] < 2:
            continue  # BatchNorm cannot train on a batch of one
        yield images, labels.long()


def save_hardness(predictor: HardnessPredictor, path: str | os.PathLike) -> None:
    """Write the predictor's state_dict (tensors only) atomically to ``path``."""
    tmp = f"{path}.tmp"
    torch.save(predictor.state_dict(), tmp)
    os.replace(tmp, path)


def load_hardness(path: str | os.PathLike, classifier: nn.Module) -> HardnessPredictor:
    """A :class:`HardnessPredictor` for ``classifier``'s architecture with the weights in ``path`` (safe loader:
    ``torch.load(weights_only=True)``, keys and shapes checked). Raises :class:`~fastig.errors.CheckpointError`
    naming the file when it is not a hardness predictor for this architecture."""
    state = read_state_dict(path)
    try:
        hidden = state["head.bn1.weight"].shape[0]
        widths = (state["head.fc1.weight"].shape[0], state["head.fc2.weight"].shape[0])
    except KeyError:
        raise CheckpointError(f"checkpoint '{path}': not a hardness predictor (no head.bn1/fc1/fc2 weights)") from None
    predictor = HardnessPredictor.from_classifier(classifier, hidden, widths)
    apply_state_dict(predictor, state, path)
    return predictor.eval()
