"""Pre-flight memory check: refuse an image size the device cannot hold before any model loads.

The estimate is a lower bound of a generation's peak: the weights, plus the VAE decoder's last block, which
runs at the full image size with its first ``block_out_channels`` (128 for SD1.5 and SDXL) and keeps at least
its input and its output alive at once, for every image decoded together, in fp32 (SD's VAE decodes in fp32;
SDXL's upcasts). A size whose lower bound already exceeds the memory the device has free cannot run; the
refusal names the largest size of the same aspect ratio whose bound fits. Sizes that pass may still run out
of GPU memory in sampling; the generation then falls back as the README describes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from omniportrait.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """What a generation on one architecture holds regardless of the size (``weights`` bytes at fp16, fp32
    twice that) and per image pixel (``decode_channels``: channels of the VAE decoder's full-size block)."""

    parameters: float
    decode_channels: int


FOOTPRINTS = {
    "sd15": Footprint(parameters=1.07e9, decode_channels=128),  # UNet 860M, text encoder 123M, VAE 84M
    "sdxl": Footprint(parameters=3.47e9, decode_channels=128),  # UNet 2.57B, text encoders 817M, VAE 84M
    "tiny": Footprint(parameters=2e6, decode_channels=32),  # omniportrait.models.tiny
}
LIVE_DECODE_TENSORS = 2
"""Full-size decoder activations alive at once, at the least (a convolution's input and output)."""
SIZE_STEP = 64


@dataclass(frozen=True)
class Estimate:
    """A lower bound of a generation's peak memory, split into the part that grows with the pixels."""

    fixed_bytes: float
    per_pixel_bytes: float

    def total(self, width: int, height: int) -> float:
        return self.fixed_bytes + self.per_pixel_bytes * width * height

    def largest_fitting(self, width: int, height: int, available: float) -> tuple[int, int] | None:
        """The largest size of the aspect ratio ``width:height`` (sides multiples of 64) whose bound fits."""
        pixels = (available - self.fixed_bytes) / self.per_pixel_bytes
        if pixels <= 0:
            return None
        scale = math.sqrt(pixels / (width * height))
        fit = (int(width * scale) // SIZE_STEP * SIZE_STEP, int(height * scale) // SIZE_STEP * SIZE_STEP)
        return fit if min(fit) >= SIZE_STEP else None


def estimate(footprint: Footprint, images: int, weight_bytes_per_parameter: int, banded_decode: bool) -> Estimate:
    """The lower bound for ``images`` images decoded together; a banded decode keeps only the output whole."""
    per_pixel = images * 4 * (3 if banded_decode else LIVE_DECODE_TENSORS * footprint.decode_channels)
    return Estimate(footprint.parameters * weight_bytes_per_parameter, per_pixel)


def available_bytes(device) -> float:
    """Free memory of ``device``: GPU memory free on CUDA, else what the OS and this process's cgroup leave."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(min(_meminfo_available(), _cgroup_room()))


def _meminfo_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def _cgroup_room() -> float:
    """The room left under a cgroup v2 memory limit (containers), or infinity without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return math.inf
    return math.inf if limit == "max" else float(int(limit) - int(used))


def check_fits(arch: str, width: int, height: int, images: int, device, dtype, banded_decode: bool | None,
               available: float | None = None) -> None:
    """``ConfigError`` naming the largest size that fits when ``width``×``height`` cannot fit on ``device``."""
    bound = estimate(FOOTPRINTS[arch], images, dtype.itemsize, bool(banded_decode))
    room = available_bytes(device) if available is None else available
    needed = bound.total(width, height)
    if needed <= room:
        return
    fit = bound.largest_fitting(width, height, room)
    where = "GPU" if device.type == "cuda" else "machine"
    advice = f"the largest that fits is about {fit[0]}x{fit[1]}" if fit else "no size fits; free some memory"
    count = f" for {images} images" if images > 1 else ""
    raise ConfigError(f"{width}x{height}{count} needs at least {needed / GIB:.1f} GiB but the {where} has "
                      f"{room / GIB:.1f} GiB free; {advice} (--width/--height{', fewer --num-images' if count else ''})")
