"""PyTorch engine: CPU or CUDA, fp32/tf32/bf16/fp16, channels-last, inference mode.

The ONNX model's weights are loaded into the project's own PtychoNN definition
(``edge_ptychonn.science.model.from_onnx``), which reads the layout (width, depth, input
size, heads) from the graph: the project's exports and PtychoNN models of the
same architecture from elsewhere (edgePtychoNN's) run alike; other graphs are
refused with the reason.

On a GPU (:class:`CudaRunner`, used only when ``torch.cuda.is_available()``):
two buffer sets, each a page-locked host input and output and a device input;
host-to-device copies on a copy stream of this consumer, the network on a
compute stream of this consumer, a CUDA graph per buffer set for the full batch
(captured at start; partial batches run eagerly; ``EngineOptions.cuda_graphs`` False
runs every batch eagerly, for comparison), the device-to-host copy
queued behind the compute. ``submit`` returns as soon as the work is queued, so
the next batch's copy-in overlaps this batch's compute; ``collect`` waits;
``done`` says whether it would wait (the pipeline's receive thread goes on
receiving until it would not).
fp32 means fp32 (TF32 off); ``tf32`` allows TF32 tensor-core math. tf32 and bf16
need compute capability 8.0 (Ampere), fp16 5.3: on an older GPU they are refused
with one line that says what to use, as the TensorRT engine refuses them.
On the CPU, ``submit`` computes the batch before it returns, so the engine holds one
batch at a time (``max_in_flight`` 1): each batch's results are published before
the next batch runs.
CI has no GPU; the CUDA path was measured on an NVIDIA H200 (docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from .base import (
    AutoCandidate, EngineOptions, EngineSpec, EngineUnavailable, ModelNotSupported, SlotRing, Ticket, check_batch,
    check_compute_capability, default_cpu_threads, engine_device, import_libraries, keep_freed_memory,
)
from .onnx_model import read_signature

log = logging.getLogger(__name__)
_WARNED_EMULATED: set[str] = set()  # precisions already said to be emulated (once per process, not per worker)


class TorchEngine:
    """Runs the model with PyTorch (the ONNX weights in the project's PtychoNN module)."""

    SPEC = EngineSpec(
        name="torch",
        summary="PyTorch: CPU or CUDA, channels-last; on CUDA pinned buffers, streams, CUDA graphs",
        requires=("torch",),
        install="pip install 'edge-ptychonn[torch]' (the CUDA build of torch on GPU hosts)",
        devices=("cpu", "cuda"),
        precisions=("fp32", "tf32", "bf16", "fp16"),
        cpu_native={"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")},
        gpu_only=("tf32",),
        # CPU ranks: frames/s relative to ONNX Runtime fp32, 1 thread, batch 8, data/ptychonn.onnx
        # (docs/benchmarks.md); bf16's phase error is stated there too.
        auto=(
            AutoCandidate("cpu", "bf16", 1.55),
            AutoCandidate("cpu", "fp32", 0.84),
            AutoCandidate("cuda", "fp16", 1.0),
        ),
    )
    name = "torch"
    max_in_flight = 2  # on a GPU; 1 on the CPU, where submit() computes the batch itself

    @staticmethod
    def count_gpus() -> int:
        """GPUs torch can use; 0 without loading torch where there is no NVIDIA driver (so
        that ``auto`` on a CPU-only machine does not load torch into every consumer)."""
        from edge_ptychonn.devices import nvidia_driver_present

        if not nvidia_driver_present():
            return 0
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def __init__(self, options: EngineOptions):
        (torch,) = import_libraries(self.SPEC, "torch")
        from edge_ptychonn.science.model import from_onnx
        self.SPEC.check_precision(options.precision)
        self._torch = torch
        signature = read_signature(options.model_path)
        device = engine_device(self.SPEC, options, self.count_gpus())
        if device != "cpu":
            self._check_gpu(torch, device, options.precision)
        if device == "cpu" and options.precision == "tf32":
            raise EngineUnavailable("tf32 is a GPU precision (NVIDIA Ampere and later); use fp32 on the CPU")
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            options.precision
        ]
        if device == "cpu":
            if not self.SPEC.native_on_cpu(options.precision) and options.precision not in _WARNED_EMULATED:
                _WARNED_EMULATED.add(options.precision)  # named on purpose: run it, but say what it costs
                log.warning("torch %s is emulated on this CPU (it has none of %s): expect it several times slower "
                            "than fp32; engine 'auto' picks only precisions native here", options.precision,
                            "/".join(self.SPEC.cpu_native.get(options.precision, ())))
            torch.set_num_threads(options.cpu_threads or default_cpu_threads())
            keep_freed_memory()
        else:
            # Process-wide switches; one engine per consumer process.
            tf32 = options.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
        try:
            module = from_onnx(options.model_path)
        except ValueError as exc:  # not PtychoNN's architecture: ONNX Runtime or TensorRT may run it
            raise ModelNotSupported(f"the torch engine runs PtychoNN graphs only: {exc}") from exc
        self._device = torch.device(device)
        self._module = None
        self._cuda: CudaRunner | None = None
        self._results: dict[int, np.ndarray] = {}
        try:
            self._start(options, signature, module, device, dtype)
        except RuntimeError as exc:
            if self._device.type != "cuda":
                raise
            # the driver refused (GPU memory full, a GPU another process holds in exclusive mode):
            # EngineUnavailable, so that 'auto' goes on to the next candidate (the CPU)
            with contextlib.suppress(RuntimeError):  # frees what was made; the driver's error above is the news
                self.close()
            raise EngineUnavailable(f"CUDA failed on {device}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _check_gpu(torch, device: str, precision: str) -> None:
        """EngineUnavailable (one line) where this GPU cannot run ``precision`` natively (tf32 and
        bf16 need compute capability 8.0, fp16 5.3), before any work on it."""
        try:
            name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        except RuntimeError as exc:  # the driver refused: 'auto' goes on to the next candidate
            raise EngineUnavailable(f"CUDA failed on {device}: {type(exc).__name__}: {exc}") from exc
        check_compute_capability(precision, name, tuple(capability))

    def _start(self, options: EngineOptions, signature, module, device: str, dtype) -> None:
        torch = self._torch
        module = module.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self._module = module
        self._dtype = dtype
        self.precision = options.precision
        self.input_shape = signature.input_shape
        self.max_batch = options.max_batch
        # the phase among the module's outputs (from_onnx: the graph's names in the module's order)
        self._output_index = list(getattr(module, "onnx_outputs", signature.output_names)).index(signature.phase_output)
        if device == "cpu":
            # submit() computes the batch before it returns: nothing overlaps, and a second
            # batch in flight would only hold back the first one's results (a batch's time).
            self.max_in_flight = 1
        self._ring = SlotRing(self.max_in_flight)
        if self._device.type == "cuda":
            self.device = f"{device} ({torch.cuda.get_device_name(self._device)})"
            self._cuda = CudaRunner(torch, self._forward, self._device, self.max_batch, self.input_shape,
                                    n_slots=self.max_in_flight, cuda_graphs=options.cuda_graphs)
        else:
            self.device = "cpu"
        # Warm up: the first call pays for lazy initialisation (and cuDNN autotuning).
        self.infer(np.zeros((self.max_batch, 1, *self.input_shape), np.float32))

    def _forward(self, x32):
        """float32 (n, 1, H, W) tensor on the engine's device -> float32 phase (n, 1, H, W)."""
        torch = self._torch
        x = x32.to(self._dtype).contiguous(memory_format=torch.channels_last)
        y = self._module(x)
        if isinstance(y, (tuple, list)):
            y = y[self._output_index]
        return y.float()

    def _run_cpu(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._forward(self._torch.from_numpy(batch)).contiguous().numpy()

    # -- Engine protocol ---------------------------------------------------------------
    def submit(self, batch: np.ndarray) -> Ticket:
        """Queue ``batch``; on a GPU returns before the result exists (collect() waits)."""
        check_batch(self, batch)
        ticket = self._ring.acquire(batch.shape[0])
        try:
            if self._cuda is not None:
                self._cuda.submit(ticket, batch)
            else:
                # Rebuilt module: any batch size, also where the ONNX batch was fixed.
                self._results[ticket.seq] = self._run_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        except BaseException:
            self._ring.cancel(ticket)
            raise
        return ticket

    def collect(self, ticket: Ticket) -> np.ndarray:
        self._ring.release(ticket)
        if self._cuda is not None:
            return self._cuda.collect(ticket)
        return self._results.pop(ticket.seq)

    def done(self, ticket: Ticket) -> bool:
        """Whether ``ticket``'s results are ready, without waiting (collect() then returns at
        once): on a GPU, its batch's event has been reached; on the CPU always (submit computed
        them)."""
        return self._cuda is None or self._cuda.ready(ticket)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(batch))

    def close(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        self._module = None
        self._results.clear()
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()


@contextlib.contextmanager
def _heuristic_convolutions(torch):
    """cuDNN picks convolution algorithms by its heuristics, not by timing them: a partial
    batch is a new input size, and with ``cudnn.benchmark`` its first run timed every
    algorithm of every layer (a batch of 6 on an H200: 477 ms, against 32 ms with the
    heuristics; a stream's last batch came up to a second late). Full batches stay tuned
    (warm-up and graph capture). The switch is process-wide: a model swap whose new
    engine warms up on another thread during a partial batch picks by heuristics too
    (at worst slower kernels for that engine, never wrong results)."""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark
    cudnn.benchmark = False
    try:
        yield
    finally:
        cudnn.benchmark = before


class CudaRunner:
    """Pinned buffers, a copy and a compute stream, CUDA graphs: the torch engine on a GPU.

    Per buffer set (slot): pinned host input (float32), device input (float32),
    pinned host output (float32), events ``copied`` and ``done``. Order of work,
    for a batch of n frames in slot s:

    1. host: copy the batch into pinned input s (the previous use of s has been
       collected, so no copy from it is pending);
    2. copy stream: wait for ``done[s]`` (the last compute reading device input s),
       copy n frames host -> device, record ``copied[s]``;
    3. compute stream: wait for ``copied[s]``; replay graph s (n == max_batch) or run
       the module eagerly on the first n rows (a partial batch with cuDNN's heuristic
       algorithms: no autotuning for each new size); copy the n results device -> pinned
       output s; record ``done[s]``;
    4. collect: wait for ``done[s]``; return a copy of the n rows of pinned output s
       (``ready``: whether it has been reached, without waiting).
    """

    def __init__(self, torch, forward, device, max_batch: int, input_shape: tuple[int, int], *,
                 n_slots: int = 2, cuda_graphs: bool = True):
        self.torch, self.forward, self.device = torch, forward, device
        self.max_batch = max_batch
        shape = (max_batch, 1, *input_shape)
        with torch.cuda.device(device):
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)
            self.h_in = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(n_slots)]
            self.h_in_np = [t.numpy() for t in self.h_in]
            self.h_out = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(n_slots)]
            self.h_out_np = [t.numpy() for t in self.h_out]
            self.d_in = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(n_slots)]
            self.copied = [torch.cuda.Event() for _ in range(n_slots)]
            self.done = [torch.cuda.Event() for _ in range(n_slots)]
            for event in self.done:
                event.record(self.compute_stream)
            self.graphs: list = []
            self.graph_out: list = []
            if cuda_graphs:
                self._capture(n_slots)

    def _capture(self, n_slots: int) -> None:
        """One CUDA graph per slot for the full batch (static input d_in[s], static output)."""
        torch = self.torch
        with torch.inference_mode(), torch.cuda.stream(self.compute_stream):
            for _ in range(3):  # warm up (cuDNN autotuning, allocator) before capture
                self.forward(self.d_in[0])
        self.compute_stream.synchronize()
        for s in range(n_slots):
            graph = torch.cuda.CUDAGraph()
            # thread_local: a model swap captures the new engine's graphs on the configure
            # thread while the old engine keeps running on the inference thread, which the
            # default ("global") mode forbids (CUDA calls in other threads fail the capture).
            with torch.inference_mode(), torch.cuda.graph(graph, stream=self.compute_stream,
                                                          capture_error_mode="thread_local"):
                out = self.forward(self.d_in[s])
            self.graphs.append(graph)
            self.graph_out.append(out)
        self.compute_stream.synchronize()

    def submit(self, ticket: Ticket, batch: np.ndarray) -> None:
        torch, s, n = self.torch, ticket.slot, ticket.n
        self.h_in_np[s][:n] = batch
        with torch.inference_mode():
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.done[s])
                self.d_in[s][:n].copy_(self.h_in[s][:n], non_blocking=True)
                self.copied[s].record(self.copy_stream)
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(self.copied[s])
                if self.graphs and n == self.max_batch:
                    self.graphs[s].replay()
                    out = self.graph_out[s]
                elif n == self.max_batch:
                    out = self.forward(self.d_in[s])
                else:
                    with _heuristic_convolutions(torch):
                        out = self.forward(self.d_in[s][:n])
                self.h_out[s][:n].copy_(out[:n], non_blocking=True)
                self.done[s].record(self.compute_stream)

    def ready(self, ticket: Ticket) -> bool:
        """Whether ``done[s]`` has been reached (the results are in pinned output s); never waits."""
        return self.done[ticket.slot].query()

    def collect(self, ticket: Ticket) -> np.ndarray:
        self.done[ticket.slot].synchronize()
        return self.h_out_np[ticket.slot][: ticket.n].copy()

    def close(self) -> None:
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()
        self.graphs, self.graph_out = [], []
