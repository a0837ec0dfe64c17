"""FaceNet's Inception-ResNet-v1 embedding network (Schroff et al. 2015), the paper's SIM model (§4.2).

Our own module definition, with the parameter names of the widely shared VGGFace2 state dict
(``20180402-114759-vggface2.pt``, 512-d embeddings, 160×160 input), so a user-supplied copy of those
weights loads with :func:`load_facenet` through ``torch.load(weights_only=True)``: no pickled code is run,
and the ``facenet-pytorch`` package (which pins old torch, numpy and Pillow) is not needed. The
classification head of that file (``logits.*``, 8631 VGGFace2 identities) is not used and is dropped.

Input: face crops resized to 160×160, pixels standardised as ``(x - 127.5) / 128`` (FaceNet's fixed
standardisation). Output: L2-normalised 512-d embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

FACENET_INPUT_SIZE = 160
FACENET_EMBEDDING_SIZE = 512
BN_EPS = 0.001  # TensorFlow's batch-norm epsilon, which the original weights were trained with
HEAD_PREFIX = "logits."
OPTIONAL_SUFFIX = "num_batches_tracked"  # batch-norm counters: absent from files saved by older torch


class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm, ReLU (the ``conv``/``bn`` pair of every Inception unit)."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(*units: nn.Module) -> nn.Sequential:
    return nn.Sequential(*units)


class ResidualInception(nn.Module):
    """``x + scale · conv1x1(concat(branches(x)))``, then ReLU unless ``relu=False`` (blocks 35, 17 and 8)."""

    def __init__(self, branches: list[nn.Module], concat_width: int, width: int, scale: float, relu: bool = True):
        super().__init__()
        for index, branch in enumerate(branches):
            self.add_module(f"branch{index}", branch)
        self.branch_count = len(branches)
        self.conv2d = nn.Conv2d(concat_width, width, kernel_size=1)
        self.scale = scale
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.branch_count)], dim=1)
        out = x + self.scale * self.conv2d(mixed)
        return F.relu(out) if self.relu else out


def block35(scale: float = 0.17) -> ResidualInception:
    """Inception-ResNet-A on 256 channels (35×35 grid in the 299 original)."""
    return ResidualInception([
        ConvBNReLU(256, 32, 1),
        chain(ConvBNReLU(256, 32, 1), ConvBNReLU(32, 32, 3, padding=1)),
        chain(ConvBNReLU(256, 32, 1), ConvBNReLU(32, 32, 3, padding=1), ConvBNReLU(32, 32, 3, padding=1)),
    ], 96, 256, scale)


def block17(scale: float = 0.10) -> ResidualInception:
    """Inception-ResNet-B on 896 channels, factorised 1×7 / 7×1 convolutions."""
    return ResidualInception([
        ConvBNReLU(896, 128, 1),
        chain(ConvBNReLU(896, 128, 1), ConvBNReLU(128, 128, (1, 7), padding=(0, 3)),
              ConvBNReLU(128, 128, (7, 1), padding=(3, 0))),
    ], 256, 896, scale)


def block8(scale: float = 0.20, relu: bool = True) -> ResidualInception:
    """Inception-ResNet-C on 1792 channels, factorised 1×3 / 3×1 convolutions."""
    return ResidualInception([
        ConvBNReLU(1792, 192, 1),
        chain(ConvBNReLU(1792, 192, 1), ConvBNReLU(192, 192, (1, 3), padding=(0, 1)),
              ConvBNReLU(192, 192, (3, 1), padding=(1, 0))),
    ], 384, 1792, scale, relu)


class Reduction(nn.Module):
    """Grid reduction: strided convolution branches and a max pool, concatenated (Mixed_6a, Mixed_7a)."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        for index, branch in enumerate(branches):
            self.add_module(f"branch{index}", branch)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.branch_count = len(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [getattr(self, f"branch{i}")(x) for i in range(self.branch_count)]
        return torch.cat(outputs + [self.pool(x)], dim=1)


def mixed_6a() -> Reduction:
    """256 -> 384 + 256 + 256 (pool) = 896 channels."""
    return Reduction([
        ConvBNReLU(256, 384, 3, stride=2),
        chain(ConvBNReLU(256, 192, 1), ConvBNReLU(192, 192, 3, padding=1), ConvBNReLU(192, 256, 3, stride=2)),
    ])


def mixed_7a() -> Reduction:
    """896 -> 384 + 256 + 256 + 896 (pool) = 1792 channels."""
    return Reduction([
        chain(ConvBNReLU(896, 256, 1), ConvBNReLU(256, 384, 3, stride=2)),
        chain(ConvBNReLU(896, 256, 1), ConvBNReLU(256, 256, 3, stride=2)),
        chain(ConvBNReLU(896, 256, 1), ConvBNReLU(256, 256, 3, padding=1), ConvBNReLU(256, 256, 3, stride=2)),
    ])


class InceptionResnetV1(nn.Module):
    """FaceNet embedding network: stem, 5×A, reduction, 10×B, reduction, 5×C + C, pool, 512-d projection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d_1a = ConvBNReLU(3, 32, 3, stride=2)
        self.conv2d_2a = ConvBNReLU(32, 32, 3)
        self.conv2d_2b = ConvBNReLU(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBNReLU(64, 80, 1)
        self.conv2d_4a = ConvBNReLU(80, 192, 3)
        self.conv2d_4b = ConvBNReLU(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[block35() for _ in range(5)])
        self.mixed_6a = mixed_6a()
        self.repeat_2 = nn.Sequential(*[block17() for _ in range(10)])
        self.mixed_7a = mixed_7a()
        self.repeat_3 = nn.Sequential(*[block8() for _ in range(5)])
        self.block8 = block8(scale=1.0, relu=False)
        self.last_linear = nn.Linear(1792, FACENET_EMBEDDING_SIZE, bias=False)
        self.last_bn = nn.BatchNorm1d(FACENET_EMBEDDING_SIZE, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 160, 160)`` standardised faces -> ``(N, 512)`` unit embeddings."""
        for stage in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b,
                      self.conv2d_4a, self.conv2d_4b, self.repeat_1, self.mixed_6a, self.repeat_2,
                      self.mixed_7a, self.repeat_3, self.block8):
            x = stage(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.normalize(self.last_bn(self.last_linear(pooled)), p=2, dim=1)


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """FaceNet's fixed standardisation of 0-255 pixels: ``(x - 127.5) / 128``."""
    return (pixels.float() - 127.5) / 128.0


class FaceNetWeightsError(ValueError):
    """The weights file is not a usable InceptionResnetV1 state dict (the message says why)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file, unpickled with ``weights_only=True``; the ``logits.*`` head dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FaceNetWeightsError(f"FaceNet weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the file
        raise FaceNetWeightsError(
            f"{path} cannot be read as a weights-only state dict ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "save the model's state_dict() with torch.save"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FaceNetWeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {key: value for key, value in state.items() if not key.startswith(HEAD_PREFIX)}


def load_facenet(path: str | Path) -> InceptionResnetV1:
    """An :class:`InceptionResnetV1` in eval mode with the weights of ``path`` (every key must match)."""
    model = InceptionResnetV1()
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(key for key in set(expected) - set(state) if not key.endswith(OPTIONAL_SUFFIX))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                           if keys)
        raise FaceNetWeightsError(f"{path} is not an InceptionResnetV1 (VGGFace2) state dict ({detail})")
    model.load_state_dict({**expected, **state})
    return model.eval()
