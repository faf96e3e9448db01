"""Small CNN image classifier whose penultimate layer is the feature space of the sample-quality metrics.

Inputs are images in the model's [-1, 1] convention (``levels_to_unit``). The trunk halves the
resolution with stride-2 convolutions until it is at most 4x4, then a linear layer gives the
``feature_dim`` features phi(x) >= 0 (after ReLU) and a linear head gives the class logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddgm.evaluation.checks import check_image_shape, check_levels
from ddgm.quantization import levels_to_unit

EVAL_BATCH_SIZE = 512
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
DROPOUT = 0.2


class FeatureClassifier(nn.Module):
    """CNN classifier for square images [N, C, S, S] in [-1, 1]; ``features`` is its penultimate layer."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int = 64) -> None:
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("image_size", image_size, 1),
            ("num_classes", num_classes, 2),
            ("feature_dim", feature_dim, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_dim = feature_dim

        width, size = 32, image_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        while size > 4:
            wider = min(2 * width, 128)
            layers += [nn.Conv2d(width, wider, 3, stride=2, padding=1), nn.ReLU()]
            width, size = wider, (size + 1) // 2
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Flatten()]
        layers += [nn.Linear(width * size * size, feature_dim), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.dropout = nn.Dropout(DROPOUT)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Expected per-image shape (C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

    def features(self, x_unit: torch.Tensor) -> torch.Tensor:
        """Penultimate features phi(x) [N, feature_dim] of images x_unit [N, C, S, S] in [-1, 1]."""
        if x_unit.dim() != 4 or tuple(x_unit.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x_unit must have shape [N, {', '.join(map(str, self.image_shape))}], got {tuple(x_unit.shape)}"
            )
        return self.trunk(x_unit)

    def forward(self, x_unit: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes] = head(dropout(phi(x)))."""
        return self.head(self.dropout(self.features(x_unit)))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter of ``module``."""
    return next(module.parameters()).device


def classify_levels(
    classifier: FeatureClassifier, levels: torch.Tensor, num_levels: int, name: str = "levels"
) -> torch.Tensor:
    """Logits [N, num_classes] (float32, on the classifier's device) of integer levels [N, C, H, W];
    ``name`` is the caller's parameter name for error messages."""
    check_levels(levels, num_levels, name)
    check_image_shape(levels, classifier.image_shape, name)
    device = module_device(classifier)
    with eval_mode(classifier), torch.no_grad():
        return torch.cat(
            [
                classifier(levels_to_unit(chunk.to(device), num_levels))
                for chunk in levels.split(EVAL_BATCH_SIZE)
            ]
        )


def check_labels(labels: torch.Tensor, num_images: int, name: str) -> torch.Tensor:
    """Return ``labels`` if it is an integer tensor [num_images] of non-negative class indices."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != num_images:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a 1-D tensor with one label per image ({num_images}), got {shape}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got min {int(labels.min())}")
    return labels


def accuracy(classifier: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, num_levels: int) -> float:
    """Fraction of images whose arg-max logit equals the label: mean_i [argmax_y f(x_i)_y = y_i]."""
    check_levels(images, num_levels, "images")
    check_labels(labels, images.shape[0], "labels")
    predictions = classify_levels(classifier, images, num_levels, name="images").argmax(dim=1)
    return (predictions.cpu() == labels.cpu()).double().mean().item()


def random_shift(x: torch.Tensor, generator: torch.Generator, fill: float = -1.0) -> torch.Tensor:
    """Shift each image in [N, C, H, W] by an independent random offset in {-1, 0, 1}^2, filling with ``fill``."""
    n, _, height, width = x.shape
    offsets = torch.randint(0, 3, (2, n), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # [N, H] rows of the padded image
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # [N, W]
    padded = F.pad(x, (1, 1, 1, 1), value=fill).permute(0, 2, 3, 1)  # [N, H+2, W+2, C]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _checked_num_classes(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_levels: int,
    num_classes: int | None,
    val_data: tuple[torch.Tensor, torch.Tensor] | None,
) -> int:
    """Check the training and validation data; ``num_classes``, defaulting to max(labels) + 1."""
    check_levels(images, num_levels, "images")
    check_labels(labels, images.shape[0], "labels")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square, got shape {tuple(images.shape)}")
    if val_data is not None:
        val_images, val_labels = val_data
        check_levels(val_images, num_levels, "val_images")
        check_image_shape(val_images, tuple(images.shape[1:]), "val_images")
        check_labels(val_labels, val_images.shape[0], "val_labels")
    max_label = int(labels.max())
    num_classes = max_label + 1 if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= max_label:
        raise ValueError(f"num_classes must be an integer > max(labels) = {max_label}, got {num_classes!r}")
    return num_classes


def _train_epoch(
    model: FeatureClassifier,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """One pass over (x, y) in a random order, minimising cross-entropy on randomly shifted batches."""
    model.train()
    for batch in torch.randperm(x.shape[0], generator=generator).to(x.device).split(batch_size):
        loss = F.cross_entropy(model(random_shift(x[batch], generator)), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_levels: int,
    num_classes: int | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    seed: int = 0,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> FeatureClassifier:
    """Train a ``FeatureClassifier`` by cross-entropy with AdamW, a cosine learning-rate decay and random
    1-pixel shifts; returned in eval mode on the images' device.

    Deterministic given ``seed`` (the global RNG state is restored afterwards). With validation data,
    the weights of the epoch with the best validation accuracy are returned (the latest on ties).
    ``num_classes`` defaults to max(labels) + 1.
    """
    _check_positive_int(epochs, "epochs")
    _check_positive_int(batch_size, "batch_size")
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels must be given together")
    val_data = (val_images, val_labels) if val_images is not None and val_labels is not None else None
    num_classes = _checked_num_classes(images, labels, num_levels, num_classes, val_data)

    device = images.device
    x = levels_to_unit(images, num_levels)
    y = labels.to(device=device, dtype=torch.int64)
    steps_per_epoch = -(-x.shape[0] // batch_size)
    cuda_devices = range(torch.cuda.device_count()) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)  # parameter initialisation and dropout
        generator = torch.Generator().manual_seed(seed)  # shuffling and shifts
        model = FeatureClassifier(images.shape[1], images.shape[2], num_classes).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        best_accuracy, best_state = -1.0, None
        for _ in range(epochs):
            _train_epoch(model, optimizer, schedule, x, y, batch_size, generator)
            if val_data is not None:
                val_accuracy = accuracy(model, *val_data, num_levels)
                if val_accuracy >= best_accuracy:
                    best_accuracy, best_state = val_accuracy, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()
