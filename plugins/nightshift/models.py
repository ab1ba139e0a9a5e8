"""Model definitions. Every model takes raw ``uint8`` NHWC pixels and returns
``(logits, embedding)``: normalisation lives inside the model, so the exported
ONNX graph carries it and training and serving cannot drift apart."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Preprocess(nn.Module):
    """uint8 NHWC -> float NCHW, normalised with the training set's statistics."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 255.0)
        return (x - self.mean) / self.std


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class SmallCNN(nn.Module):
    """A small fast CNN (airbench-style conv/BN/GELU blocks with pooling).

    Works from 8×8 digits up to 32×32 CIFAR-sized images; pools only while the
    feature map is larger than 2×2.
    """

    def __init__(self, in_channels: int, num_classes: int, image_hw: tuple[int, int], width: int = 32):
        super().__init__()
        widths = [width, width * 2, width * 4]
        layers: list[nn.Module] = []
        cin, h = in_channels, min(image_hw)
        for w in widths:
            layers.append(_block(cin, w))
            layers.append(_block(w, w))
            if h > 2:
                layers.append(nn.MaxPool2d(2))
                h //= 2
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.pool(self.features(x)).flatten(1)
        return self.head(emb), emb


class ResNet18(nn.Module):
    """torchvision's ResNet-18, randomly initialised (no hub weights here)."""

    def __init__(self, in_channels: int, num_classes: int, image_hw: tuple[int, int], width: int = 64):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3 or min(image_hw) < 64:  # small images: CIFAR-style stem
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.embedding_dim = net.fc.in_features
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.body(x)
        return self.head(emb), emb


ARCHITECTURES: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "resnet18": ResNet18}


class Classifier(nn.Module):
    """Preprocessing + backbone: ``uint8 [N,H,W,C] -> (logits, embedding)``."""

    def __init__(self, arch: str, num_classes: int, image_shape: tuple[int, int, int],
                 mean: list[float], std: list[float], width: int = 32):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown model {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        h, w, c = image_shape
        self.config: dict[str, Any] = {"arch": arch, "num_classes": num_classes, "image_shape": list(image_shape),
                                       "mean": list(mean), "std": list(std), "width": width}
        self.preprocess = Preprocess(mean, std)
        self.net = ARCHITECTURES[arch](c, num_classes, (h, w), width=width)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(self.preprocess(pixels))


def classifier_from_checkpoint(ckpt: dict[str, Any]) -> Classifier:
    cfg = ckpt["model_config"]
    model = Classifier(cfg["arch"], cfg["num_classes"], tuple(cfg["image_shape"]), cfg["mean"], cfg["std"],
                       width=cfg["width"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
