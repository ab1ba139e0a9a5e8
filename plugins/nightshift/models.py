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


def _bn(c: int) -> nn.BatchNorm2d:
    """BatchNorm with a fixed scale of 1 and a learned shift (the speed records' choice)."""
    bn = nn.BatchNorm2d(c, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


class _ConvGroup(nn.Module):
    """conv -> (max-pool) -> BN -> GELU -> conv -> BN -> GELU; convs start as identity (dirac)."""

    def __init__(self, cin: int, cout: int, pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm1, self.conv2, self.norm2 = _bn(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False), _bn(cout)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            w = conv.weight.data
            nn.init.dirac_(w[:w.size(1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastCNN(nn.Module):
    """The default for images of 16 px and up, after the CIFAR-10 speed records
    (Page's ResNet, hlb-CIFAR10, Keller Jordan's airbench): a 2×2 patch-whitening
    first conv whose weights come from the training data's patch covariance
    (:meth:`init_whitening`, then frozen), three conv-pool-BN-GELU groups of
    widths ``width, 4·width, 4·width``, global max-pool and a scaled linear head.

    The whitening weights are ordinary parameters, so the checkpoint carries
    them and ONNX export sees a plain conv.
    """

    def __init__(self, in_channels: int, num_classes: int, image_hw: tuple[int, int], width: int = 64):
        super().__init__()
        patch = in_channels * 4
        self.whiten = nn.Conv2d(in_channels, 2 * patch, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        widths = [width, 4 * width, 4 * width]
        groups, cin, h = [], 2 * patch, min(image_hw) - 1
        for w in widths:
            pool = h >= 4
            groups.append(_ConvGroup(cin, w, pool))
            h = h // 2 if pool else h
            cin = w
        self.groups = nn.Sequential(*groups)
        self.embedding_dim = cin
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.scale = 1 / 9

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2×2 patches of ``x`` (normalised float NCHW).

        Each output pair is ``±`` one eigenvector of the patch covariance divided by
        the square root of its eigenvalue, so GELU loses no sign information.
        """
        c = x.shape[1]
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / max(len(patches) - 1, 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).reshape(-1, c, 2, 2)
        filters = torch.cat([filters, -filters]).to(self.whiten.weight.dtype)
        self.whiten.weight.copy_(filters)
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.groups(self.act(self.whiten(x)))
        emb = x.amax(dim=(2, 3))
        return self.head(emb) * self.scale, emb


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


ARCHITECTURES: dict[str, type[nn.Module]] = {"fast_cnn": FastCNN, "small_cnn": SmallCNN, "resnet18": ResNet18}


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
