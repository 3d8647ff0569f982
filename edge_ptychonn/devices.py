"""Device strings: parsed and validated in one place, resolved to one device per consumer.

Used by the processor-argument validation (``edge_ptychonn.stream.config``) and by
every engine; it imports nothing beyond the standard library, so validation works
on any machine, with or without numpy, torch or a GPU.

Accepted strings (:data:`DEVICES_HELP`):

``auto``
    a GPU when the engine can use one and one is visible, else the CPU; consumer
    ``k`` (PvaPy's ``processorId``, 1-based) takes GPU ``(k - 1) mod nGPUs``.
``cpu``
    the CPU.
``cuda``
    a GPU, placed as with ``auto``; an error when none is visible.
``cuda:N``
    GPU ``N`` for every consumer.
``cuda:A,B,...``
    a consumer-to-GPU map: consumer ``k`` takes entry ``(k - 1) mod length``,
    e.g. ``cuda:0,0,1,1`` puts consumers 1-2 on GPU 0 and 3-4 on GPU 1 (entries
    may also be written ``cuda:N``).

GPU indices count the GPUs this process sees (after ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEVICES_HELP = (
    "'auto', 'cpu', 'cuda', 'cuda:N', or a consumer-to-GPU map 'cuda:A,B,...' "
    "(consumer k takes entry (k-1) mod length)"
)


class DeviceUnavailable(RuntimeError):
    """The device asked for does not exist here (no GPU, or too few)."""


@dataclass(frozen=True)
class DeviceRequest:
    """A parsed device string."""

    kind: str  # 'auto', 'cpu' or 'cuda'
    indices: tuple[int, ...] = ()  # cuda: explicit GPU per consumer, cycled; () = default placement

    def __str__(self) -> str:
        if self.kind != "cuda" or not self.indices:
            return self.kind
        return "cuda:" + ",".join(str(i) for i in self.indices)


def parse_device(text: str) -> DeviceRequest:
    """Parse a device string; ``ValueError`` naming the accepted forms otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"device must be {DEVICES_HELP}, got {text!r}")
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda"):
        return DeviceRequest(value)
    head, sep, rest = value.partition(":")
    if head == "cuda" and sep and rest:
        items = [item.strip() for item in rest.split(",")]
        items = [item[len("cuda:"):] if item.startswith("cuda:") else item for item in items]
        if all(item.isascii() and item.isdigit() for item in items):
            return DeviceRequest("cuda", tuple(int(item) for item in items))
    raise ValueError(f"device must be {DEVICES_HELP}, got {text!r}")


def default_gpu(processor_id: int, n_gpus: int) -> int:
    """Consumer ``processor_id`` (1-based) -> GPU ``(processor_id - 1) mod n_gpus``."""
    if n_gpus < 1:
        raise ValueError("no GPU to place a consumer on")
    return (max(int(processor_id), 1) - 1) % n_gpus


def resolve_device(
    text: str | DeviceRequest, processor_id: int, n_gpus: int, *, supports_cuda: bool = True,
    supports_cpu: bool = True, engine: str = "this engine",
) -> str:
    """One device for consumer ``processor_id``: ``'cpu'`` or ``'cuda:N'``.

    ``n_gpus`` is how many GPUs the engine's library sees. ``auto`` falls back to
    the CPU when there is no GPU (or the engine has no GPU path); an explicit
    ``cuda...`` request that cannot be met raises :class:`DeviceUnavailable`, as
    does ``cpu`` for an engine without a CPU path.
    """
    request = parse_device(text) if isinstance(text, str) else text
    if request.kind == "auto":
        if supports_cuda and n_gpus > 0:
            return f"cuda:{default_gpu(processor_id, n_gpus)}"
        if not supports_cpu:
            raise DeviceUnavailable(f"{engine} runs on NVIDIA GPUs only, and none is visible here")
        return "cpu"
    if request.kind == "cpu":
        if not supports_cpu:
            raise DeviceUnavailable(f"{engine} runs on NVIDIA GPUs only, not on the CPU")
        return "cpu"
    if not supports_cuda:
        raise DeviceUnavailable(f"{engine} runs on the CPU only, not on {request}")
    if n_gpus < 1:
        raise DeviceUnavailable(f"device {str(request)!r} asked for, but {engine} sees no CUDA GPU")
    if not request.indices:
        return f"cuda:{default_gpu(processor_id, n_gpus)}"
    index = request.indices[(max(int(processor_id), 1) - 1) % len(request.indices)]
    if index >= n_gpus:
        raise DeviceUnavailable(
            f"device {str(request)!r} gives consumer {processor_id} GPU {index}, but {engine} sees {n_gpus} GPU(s)"
        )
    return f"cuda:{index}"


def gpu_index(device: str) -> int | None:
    """``'cuda:N'`` -> N; ``'cpu'`` -> None (for resolved devices)."""
    head, _, index = device.partition(":")
    return int(index or 0) if head == "cuda" else None


# What an NVIDIA driver leaves on a machine whose GPUs a CUDA library could use: the control
# device node (also inside containers given a GPU), WSL's GPU node, the driver's /proc entry
NVIDIA_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/dxg", "/proc/driver/nvidia")


def nvidia_driver_present() -> bool:
    """Whether this machine shows any sign of an NVIDIA driver (:data:`NVIDIA_DRIVER_PATHS`).
    Where it shows none, no CUDA library finds a GPU, and none need be loaded to learn
    that (importing torch takes seconds, once per consumer)."""
    return any(Path(path).exists() for path in NVIDIA_DRIVER_PATHS)


def visible_gpu_count() -> int:
    """NVIDIA GPUs this process may use, without loading any CUDA library.

    Counts the driver's ``/proc/driver/nvidia/gpus`` entries, limited by
    ``CUDA_VISIBLE_DEVICES`` when it is set, read as CUDA reads it (see
    :func:`cuda_visible_count`). Engines ask their own library when it is loaded.
    """
    try:
        physical = len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return physical if visible is None else cuda_visible_count(visible, physical)


def cuda_visible_count(visible: str, physical: int) -> int:
    """How many of ``physical`` GPUs ``CUDA_VISIBLE_DEVICES=visible`` leaves visible.

    A list of indices (each read as far as its leading digits go) or of ids (``GPU-...``,
    ``MIG-...``, as the first entry is), up to the first entry that is not one: an empty
    one, a negative index, a word (``NoDevFiles``, what some batch systems set when no GPU
    was granted), an index beyond the GPUs there are, an id among indices or the other way
    round. A GPU named twice leaves none visible.
    """
    items = [item.strip() for item in visible.split(",")]
    by_id = items[0][:4] in ("GPU-", "MIG-")
    named: list = []
    for item in items:
        if by_id:
            if item[:4] != items[0][:4]:
                break
            gpu = item
        else:
            digits = len(item) - len(item.lstrip("0123456789"))
            if not digits or int(item[:digits]) >= physical:
                break
            gpu = int(item[:digits])
        if gpu in named:
            return 0
        named.append(gpu)
    return min(len(named), physical)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
