"""Small models covering the module kinds MK must handle (shared by the tests)."""

import torch
import torchvision
from torch import nn


class TiedLM(nn.Module):
    """Embedding whose matrix is also the output head (T5/GPT style)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mix(self.embed(tokens)))))


class BatchFirstEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator, dtype=module.running_mean.dtype))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator, dtype=module.running_var.dtype) + 0.5)


def zoo() -> dict:
    """name -> (model factory, input factory, loss)"""
    return {
        "mlp": (mlp, lambda g: torch.randn(8, 3, 4, generator=g)),
        "cnn_bn": (cnn, lambda g: torch.randn(4, 3, 8, 8, generator=g)),
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), lambda g: torch.randn(2, 3, 32, 32, generator=g)),
        "transformer": (BatchFirstEncoder, lambda g: torch.randn(3, 5, 16, generator=g)),
        "tied_lm": (TiedLM, lambda g: torch.randint(0, 50, (4, 6), generator=g)),
    }
