"""Engine-alone benchmark: model FLOPs counted from the ONNX graph, the machine's
measured arithmetic peak, and each engine's frames/s by batch size and precision.

FLOPs per frame: each ``Conv`` / ``ConvTranspose`` node contributes
``2 x output elements x (in_channels / groups) x kernel area`` (one multiply and
one add per MAC), ``Gemm`` / ``MatMul`` ``2 x M x N x K``. Shapes come from ONNX
shape inference with the batch fixed to one frame; pointwise and pooling ops
(ReLU, Resize, MaxPool, Tanh, ...) are counted separately as one op per output
element and are not part of the FLOPs (they are well under 1 % for PtychoNN).

Peak: the best rate of a large square matrix product in the same process on the
same cores (torch for fp32 / bf16 / fp16; numpy and ONNX Runtime's MatMul for
fp32), i.e. what the machine reaches on the friendliest dense workload, not a
datasheet number. Libraries differ by up to 2x on one CPU (on an AMD EPYC, 2
cores: ONNX Runtime 415-468 fp32 GFLOP/s, torch and numpy 210-246: their BLAS
does not use all of that CPU's vector units), so the peak is the best of all. A precision
the CPU has no instructions for (e.g. fp16 without AVX512-FP16/AMX-FP16, as the
engines declare in their ``SPEC.cpu_native``) is emulated: its matrix product
measures the emulation, not a limit of the machine, so engines in an emulated
precision are compared with the fp32 peak (the units that really do the work)
and marked ``emulated``. With ``--device`` on a GPU the peaks are the GPU's: torch's
matrix product there, fp32 (TF32 off), tf32, bf16 and fp16, on larger matrices.

Engines and precisions come from the engines' own declarations (``SPEC``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engines.base import usable_cores

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SKIP_OPS = ("Constant", "Identity", "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def engine_precisions(device: str = "cpu", engines: list[str] | None = None) -> dict[str, tuple[str, ...]]:
    """{engine: precisions it offers on ``device``'s kind}, from the engines' SPECs; by
    default every installed engine that runs the model (not the zero-cost stand-in)."""
    from engines import registry

    kind = "cpu" if device == "cpu" else "cuda"
    names = engines if engines is not None else registry.available_engines(models_only=True)
    out = {}
    for name in names:
        spec = registry.spec(name)
        precisions = spec.precisions_on(kind) or (spec.precisions_on("cpu") if device == "auto" else ())
        if precisions:
            out[name] = precisions
    return out


def precision_is_native(precision: str, engine: str = "torch") -> bool:
    """Whether ``engine`` runs ``precision`` natively on this CPU (its SPEC says which flags it needs)."""
    from engines import registry

    return registry.spec(engine).native_on_cpu(precision)


@dataclass(frozen=True)
class FlopCount:
    """Arithmetic of one frame through the model."""

    flops_per_frame: float  # 2 x MACs of Conv / ConvTranspose / Gemm / MatMul
    other_ops_per_frame: float  # one op per output element of every other node
    by_op: dict  # op type -> FLOPs per frame
    n_nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def count_flops(model_path: str | Path) -> FlopCount:
    """FLOPs per frame of an ONNX model with one (N, C, H, W) input."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path))
    initializers = {i.name: list(i.dims) for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{model_path}: expected one input, found {[i.name for i in inputs]}")
    first = inputs[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else 1
    if batch == 1:
        first.ClearField("dim_param")
        first.dim_value = 1
    # Drop the exporter's shapes (symbolic batch) so inference recomputes them for this batch.
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.shape.dim[0].ClearField("dim_param")
        output.type.tensor_type.shape.dim[0].ClearField("dim_value")
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update(initializers)

    def shape(name: str, node) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise ValueError(f"{model_path}: cannot infer the shape of {name!r} ({node.op_type} {node.name!r}): {dims}")
        return dims

    by_op: dict[str, float] = {}
    other = 0.0
    for node in inferred.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w = shape(node.input[1], node)  # Conv (M, C/g, k...), ConvTranspose (C, M/g, k...)
            kernel = int(np.prod(w[2:]))
            if op == "Conv":
                flops = 2.0 * np.prod(shape(node.output[0], node)) * w[1] * kernel
            else:
                flops = 2.0 * np.prod(shape(node.input[0], node)) * w[1] * kernel
        elif op in ("Gemm", "MatMul"):
            a, b = shape(node.input[0], node), shape(node.input[1], node)
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[-2] if trans_a else a[-1]
            flops = 2.0 * np.prod(shape(node.output[0], node)) * k
            del b
        else:
            if op not in SKIP_OPS:
                dims = shapes.get(node.output[0])
                if dims and all(d is not None for d in dims):
                    other += float(np.prod(dims))
            continue
        by_op[op] = by_op.get(op, 0.0) + float(flops) / batch
    if not by_op:
        raise ValueError(f"{model_path}: no Conv, ConvTranspose, Gemm or MatMul node to count")
    return FlopCount(
        flops_per_frame=sum(by_op.values()), other_ops_per_frame=other / batch,
        by_op=by_op, n_nodes=len(inferred.graph.node),
    )


# -- machine peak ------------------------------------------------------------------------
def measure_peak(precision: str = "fp32", library: str = "torch", size: int = 2048, seconds: float = 1.0,
                 device: str = "cpu") -> float:
    """Best FLOP/s of a ``size`` x ``size`` matrix product (2 size^3 FLOPs) over ``seconds``;
    torch only on a GPU (``device`` 'cuda:N'), each product timed to its end
    (``torch.cuda.synchronize``). tf32 only on a GPU: fp32 with TF32 tensor-core math
    (fp32 is fp32 there, TF32 off, as the engines run it)."""
    if device != "cpu" and library != "torch":
        raise ValueError(f"on a GPU the peak is measured with torch, not {library!r}")
    if precision == "tf32" and device == "cpu":
        raise ValueError("tf32 is a GPU precision: its peak is measured on a GPU only")
    flops = 2.0 * size**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    if library == "numpy":
        if precision != "fp32":
            raise ValueError(f"numpy peak is measured for fp32 only, not {precision}")
        c = np.empty_like(a)
        run = lambda: np.matmul(a, b, out=c)  # noqa: E731
    elif library == "onnxruntime":
        if precision != "fp32":
            raise ValueError(f"the onnxruntime peak is measured for fp32 only, not {precision}")
        session = _matmul_session(size)
        feeds = {"a": a, "b": b}
        run = lambda: session.run(None, feeds)  # noqa: E731
    elif library == "torch":
        import torch

        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        ta, tb = (torch.from_numpy(m).to(device=device, dtype=dtype) for m in (a, b))
        tc = torch.empty_like(ta)
        wait = (lambda: torch.cuda.synchronize(device)) if device != "cpu" else (lambda: None)

        def run():
            with torch.inference_mode():
                torch.matmul(ta, tb, out=tc)
            wait()

        if device != "cpu":
            with _tf32(torch, precision == "tf32"):
                return flops / _best_time(run, seconds)
    else:
        raise ValueError(f"unknown library {library!r}; known: numpy, onnxruntime, torch")
    return flops / _best_time(run, seconds)


def _best_time(run, seconds: float) -> float:
    """The shortest of the runs of ``run`` over ``seconds``, after one warm-up run (thread
    pool, packing buffers, a GPU's kernel selection)."""
    run()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            return best


@contextlib.contextmanager
def _tf32(torch, allow: bool):
    """TF32 matrix products on a GPU allowed (tf32) or not (fp32), restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _matmul_session(size: int):
    """An ONNX Runtime session computing ``c = a @ b`` for ``size`` x ``size`` fp32 matrices."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    matrix = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size])  # noqa: E731
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [matrix("a"), matrix("b")], [matrix("c")])
    # IR version 8 (opset 17): read by every ONNX Runtime this project supports
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def measure_peaks(precisions, seconds: float = 0.7, sizes=(512, 1024, 2048), device: str = "cpu") -> dict:
    """{precision: {"flops_per_s": best, "by_library": {library: best}, "by_size": {...},
    "emulated": bool, "device": device}}.

    The peak of a precision is the best rate over the libraries and matrix sizes
    (small ones fit the caches, large ones amortise the packing). On a GPU
    (``device`` 'cuda:N'): torch alone, tf32 too, nothing emulated."""
    import importlib.util

    have_torch = importlib.util.find_spec("torch") is not None
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    on_gpu = device != "cpu"
    peaks = {}
    for precision in precisions:
        by_library, by_size = {}, {}
        fp32_only = [] if on_gpu else ["numpy"] + (["onnxruntime"] if have_ort else [])
        libraries = (fp32_only if precision == "fp32" else []) + (["torch"] if have_torch else [])
        if precision == "tf32" and not on_gpu:
            libraries = []
        for library in libraries:
            for size in sizes:
                rate = measure_peak(precision, library, size, seconds, device)
                by_size[f"{library} {size}"] = rate
                by_library[library] = max(by_library.get(library, 0.0), rate)
        if by_library:
            peaks[precision] = {"flops_per_s": max(by_library.values()), "by_library": by_library, "by_size": by_size,
                                "emulated": have_torch and not on_gpu and not precision_is_native(precision),
                                "device": device}
    return peaks


# -- engine alone --------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineResult:
    engine: str
    device: str
    precision: str
    threads: int  # cpu_threads given to the engine (per worker)
    batch: int
    frames_per_s: float
    batch_ms_p50: float
    n_batches: int
    percent_of_peak: float | None  # FLOPs/frame x frames/s / peak of peak_basis (None: no peak of that device)
    emulated: bool = False  # the precision has no instructions on this CPU: compared with the fp32 peak
    peak_basis: str | None = None  # the precision whose measured peak the percentage is of
    workers: int = 1  # cpu_workers: copies of the engine running batches at once (engines.workers)
    cuda_graphs: bool | None = None  # torch on a GPU: full batches replayed from a CUDA graph (None: not torch CUDA)

    def to_dict(self) -> dict:
        return asdict(self)


def time_engine(engine, batch: int, seconds: float, rng: np.random.Generator,
                repeats: int = 1) -> tuple[float, float, int]:
    """(frames/s, median ms between results, batches timed) of the engine on random input.

    An engine with ``submit``/``collect`` is kept ``max_in_flight`` batches deep, as
    the pipeline keeps it (CPU workers run their batches at once; a GPU engine
    overlaps copies with compute); others run ``infer`` one batch at a time.
    ``repeats`` windows of ``seconds`` each; the rate is the best window's. On a
    shared machine a passing load only slows a window down (it never speeds one
    up), so the best window is the engine's own rate, and a ratio against it is
    not flattered by a slow denominator."""
    h, w = engine.input_shape
    x = rng.random((batch, 1, h, w), dtype=np.float32)
    engine.infer(x)  # warm-up for this batch size
    depth = max(1, int(getattr(engine, "max_in_flight", 1))) if callable(getattr(engine, "submit", None)) else 1
    times, best = [], 0.0
    for _ in range(max(1, repeats)):
        n0 = len(times)
        tickets = [engine.submit(x) for _ in range(depth - 1)] if depth > 1 else []
        start = t0 = time.perf_counter()
        while True:
            if depth > 1:
                tickets.append(engine.submit(x))
                engine.collect(tickets.pop(0))
            else:
                engine.infer(x)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
            if t1 - start >= seconds and len(times) - n0 >= 2:
                break
        best = max(best, batch * (len(times) - n0) / (time.perf_counter() - start))
        for ticket in tickets:
            engine.collect(ticket)
    return best, float(np.median(times) * 1e3), len(times)


def bench_engines(
    model_path: Path, engines: list[str], batches: list[int], precisions: dict[str, tuple[str, ...]],
    seconds: float, flops_per_frame: float, peaks: dict, threads: list[int] | None = None, device: str = "cpu",
    progress=None, repeats: int = 1, workers: list[int] | None = None, into: list | None = None,
    cuda_graphs: tuple[bool, ...] = (True,),
) -> tuple[list[EngineResult], list[dict]]:
    """Time every (engine, precision, layout, batch), best of ``repeats`` windows of
    ``seconds``; returns (results, skipped with reasons). A layout is ``threads`` per
    engine and ``workers`` engine copies running batches at once; on the CPU, more
    than one worker only where workers x threads fits the cores (when no layout
    does, each is in skipped with the reason). On a GPU the torch engine runs once
    per value of ``cuda_graphs`` (with and without CUDA graphs), with an engine per batch
    size (its graph is captured for the engine's full batch). ``into`` gets each
    result as it is measured (a run cut short keeps those)."""
    rng = np.random.default_rng(0)
    results, skipped = [], []
    cores = usable_cores()
    threads = threads or [cores]
    wanted = [(t, w) for t in threads for w in sorted(set(workers or [1]))]
    layouts = [(t, w) for t, w in wanted if w == 1 or (device == "cpu" and t * w <= cores)]
    if not layouts:  # nothing to time: say why, not an empty table
        for e, p, (t, w) in [(e, p, layout) for e in engines for p in precisions.get(e, ("fp32",)) for layout in wanted]:
            reason = (f"{w} workers x {t} threads do not fit the {cores} cores" if device == "cpu"
                      else "more than one worker runs on the CPU only")
            skipped.append({"engine": e, "precision": p, "threads": t, "workers": w, "reason": reason})
            if progress:
                progress(f"engine {e} {p} {t} thread(s) x {w} workers: skipped ({reason})")
    graph_modes = tuple(dict.fromkeys(cuda_graphs)) or (True,)
    for name, precision, (n_threads, n_workers), graphs in [
        (e, p, layout, g) for e in engines for p in precisions.get(e, ("fp32",)) for layout in layouts
        for g in (graph_modes if e == "torch" and device != "cpu" else (True,))
    ]:
        # torch on a GPU captures its graph for the engine's full batch: one engine per batch size,
        # so that each batch is a full one (others time every batch on one engine)
        groups = [[b] for b in batches] if name == "torch" and device != "cpu" else [batches]
        for group in groups:
            if not _time_layout(name, precision, n_threads, n_workers, graphs, group, model_path, device, seconds,
                                flops_per_frame, peaks, rng, repeats, results, skipped, into, progress):
                break  # the engine cannot start: said once, in skipped
    return results, skipped


def _peak_basis(engine: str, precision: str, on_cpu: bool, emulated: bool, peaks: dict) -> str | None:
    """The precision whose measured peak an engine's '% of peak' is of: its own (on a CPU, fp32
    where it is emulated); None for the zero-cost stand-in (it does none of the model's
    arithmetic) and where the peaks were measured on another kind of device (a GPU engine
    against a CPU's peak says nothing)."""
    from engines import registry

    if not registry.spec(engine).computes_model:
        return None
    basis = "fp32" if on_cpu and (emulated or precision == "tf32") else precision
    measured_on_cpu = peaks.get(basis, {}).get("device", "cpu") == "cpu"
    return basis if measured_on_cpu == on_cpu else None


def _time_layout(name: str, precision: str, n_threads: int, n_workers: int, graphs: bool, batches: list[int],
                 model_path: Path, device: str, seconds: float, flops_per_frame: float, peaks: dict, rng,
                 repeats: int, results: list, skipped: list, into: list | None, progress) -> bool:
    """Time one engine (created for the largest of ``batches``) at each of ``batches``; False
    (and the reason in ``skipped``) when it cannot start."""
    from engines import EngineOptions, create_engine, registry

    label = f"{name} {precision} {n_threads} thread(s)" + (f" x {n_workers} workers" if n_workers > 1 else "")
    label += "" if graphs else " without CUDA graphs"
    try:
        engine = create_engine(name, EngineOptions(
            model_path=model_path, device=device, precision=precision,
            max_batch=max(batches), cpu_threads=n_threads, cpu_workers=n_workers, cuda_graphs=graphs,
        ))
    except Exception as exc:  # a library missing, or an engine that cannot load this model: report why
        reason = f"{type(exc).__name__}: {exc}"
        skipped.append({"engine": name, "precision": precision, "threads": n_threads, "workers": n_workers,
                        "reason": reason})
        if progress:
            progress(f"engine {label}: skipped ({reason})")
        return False
    try:
        # 'auto' stands for the engine and precision it chose: those declare what is native
        ran, ran_precision = (engine.name, engine.precision) if name == "auto" else (name, precision)
        shown = f"auto ({ran})" if name == "auto" else name
        label = label.replace(f"{name} {precision} ", f"{shown} {ran_precision} ", 1)
        on_cpu = engine.device.startswith("cpu")
        emulated = on_cpu and not registry.spec(ran).native_on_cpu(ran_precision)
        basis = _peak_basis(ran, ran_precision, on_cpu, emulated, peaks)
        torch_cuda = ran == "torch" and not on_cpu
        for batch in batches:
            fps, ms, n = time_engine(engine, batch, seconds, rng, repeats)
            peak = peaks.get(basis, {}).get("flops_per_s") if basis else None
            pct = 100.0 * fps * flops_per_frame / peak if peak else None
            results.append(EngineResult(shown, engine.device, ran_precision, n_threads, batch, fps, ms, n, pct,
                                        emulated, basis, n_workers, graphs if torch_cuda else None))
            if into is not None:
                into.append(results[-1])
            if progress:
                pct_text = f", {pct:.1f} % of {basis} peak" if pct is not None else ""
                pct_text += " (emulated precision)" if emulated else ""
                progress(f"engine {label} batch {batch}: {fps:.1f} frames/s{pct_text}")
    finally:
        engine.close()
    return True
