"""Engine names -> classes, what each declares, and the ``auto`` choice.

Adding an engine is one file (a class with a ``SPEC``, see ``engines.base``) and
one line in :data:`ENGINES`. Everything else here reads the engines' ``SPEC``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, replace

from edge_ptychonn.warnings_shown import warn

from .base import AutoCandidate, Engine, EngineOptions, EngineSpec, EngineUnavailable

log = logging.getLogger(__name__)

# name -> "module:Class"; the module is imported to read its SPEC (engine modules
# import their heavy libraries only when an engine is created).
ENGINES = {
    "tensorrt": "engines.tensorrt_engine:TensorRTEngine",
    "torch": "engines.torch_engine:TorchEngine",
    "onnxruntime": "engines.onnxruntime_engine:OnnxRuntimeEngine",
    "zero": "engines.zero_engine:ZeroEngine",
}
ENGINE_NAMES = ("auto", *ENGINES)


def check_name(name: str) -> None:
    """ValueError naming the known engines unless ``name`` is one ('auto' included);
    imports nothing."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")


def engine_class(name: str):
    check_name(name)
    if name == "auto":
        raise ValueError("'auto' stands for an engine chosen at run time; it has no class")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def spec(name: str) -> EngineSpec:
    """The ``EngineSpec`` of engine ``name``."""
    return engine_class(name).SPEC


def specs() -> dict[str, EngineSpec]:
    return {name: spec(name) for name in ENGINES}


def missing_libraries(engine_spec: EngineSpec) -> list[str]:
    """The modules ``engine_spec`` requires that cannot be imported here."""
    return [m for m in engine_spec.requires if importlib.util.find_spec(m) is None]


def available_engines(*, models_only: bool = False) -> list[str]:
    """Engines whose required libraries import on this machine (devices not checked).
    ``models_only`` leaves out stand-ins that do not run the network (``zero``)."""
    return [
        name for name, s in specs().items()
        if not missing_libraries(s) and (s.computes_model or not models_only)
    ]


def count_gpus(name: str) -> int:
    """GPUs engine ``name`` can use here (0 when its libraries are missing)."""
    cls = engine_class(name)
    if "cuda" not in cls.SPEC.devices or missing_libraries(cls.SPEC):
        return 0
    counter = getattr(cls, "count_gpus", None)
    if counter is None:
        from edge_ptychonn.devices import visible_gpu_count

        return visible_gpu_count()
    try:
        return int(counter())
    except Exception as exc:  # a broken driver or library: no GPU for this engine, say why
        log.info("engine %s: cannot count GPUs (%s: %s); treating as none", name, type(exc).__name__, exc)
        return 0


@dataclass(frozen=True)
class AutoChoice:
    engine: str
    precision: str
    device_kind: str  # 'cuda' or 'cpu'
    reason: str


def auto_candidates(options: EngineOptions) -> tuple[list[AutoChoice], list[str]]:
    """Every (engine, precision) ``auto`` could run here, best first, and why others cannot.

    GPU candidates come first (when the device string allows a GPU), each ranked
    by its ``SPEC.auto``; then CPU candidates, ranked by their measured speed,
    limited to precisions native on this CPU. An explicit ``precision`` (not
    ``'auto'``) keeps only candidates of that precision, plus, when none offers
    it, the engines that offer it on that device (tf32: on a GPU only).
    """
    from edge_ptychonn.devices import cpu_flags, parse_device

    request = parse_device(options.device)
    kinds = ["cpu"] if request.kind == "cpu" else (["cuda"] if request.kind == "cuda" else ["cuda", "cpu"])
    flags = cpu_flags()
    ranked: list[tuple[float, int, AutoChoice]] = []
    rejected: list[str] = []
    for order, (name, s) in enumerate(specs().items()):
        missing = missing_libraries(s)
        for kind in kinds:
            candidates = [c for c in s.auto if c.device == kind]
            if options.precision != "auto":
                wanted = [c for c in candidates if c.precision == options.precision]
                if not wanted and options.precision in s.precisions_on(kind) and s.auto:
                    wanted = [AutoCandidate(kind, options.precision, min(c.rank for c in s.auto) / 10)]
                elif not wanted and kind in s.devices and options.precision in s.gpu_only and s.auto:
                    rejected.append(f"{name} {options.precision} on the CPU ({options.precision} is a GPU precision)")
                candidates = wanted
            if not candidates:
                continue
            if missing:
                rejected.append(f"{name} ({', '.join(missing)} not installed)")
                break
            if kind == "cuda" and count_gpus(name) == 0:
                rejected.append(f"{name} on a GPU (no CUDA GPU visible to it)")
                continue
            for c in candidates:
                if kind == "cpu" and not s.native_on_cpu(c.precision, flags):
                    rejected.append(f"{name} {c.precision} on this CPU (emulated: no {'/'.join(s.cpu_native.get(c.precision, ()))})")
                    continue
                why = (f"{name} {c.precision} on {'a GPU' if kind == 'cuda' else 'the CPU'}, rank {c.rank:g}")
                ranked.append((c.rank if kind == "cpu" else 1e6 + c.rank, -order, AutoChoice(name, c.precision, kind, why)))
    ranked.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [choice for _, _, choice in ranked], rejected


def auto_choice(options: EngineOptions) -> AutoChoice:
    """The engine and precision ``auto`` stands for here, with the reason."""
    choices, rejected = auto_candidates(options)
    if not choices:
        raise EngineUnavailable(
            f"engine 'auto' found nothing to run device {options.device!r} precision {options.precision!r}"
            + (f"; not usable: {'; '.join(rejected)}" if rejected else "")
        )
    best = choices[0]
    reason = best.reason + (f"; not usable here: {'; '.join(rejected)}" if rejected else "")
    return replace(best, reason=reason)


def create_engine(name: str, options: EngineOptions, logger: logging.Logger | None = None) -> Engine:
    """Create the engine called ``name`` ('auto' chooses, and logs why, to ``logger``: the
    caller's, e.g. a processor's, whose lines a consumer shows; this module's by default);
    raises ValueError for an unknown name and EngineUnavailable when it cannot run here.

    With ``auto``, a candidate that fails to start (EngineUnavailable) is logged and
    the next one is tried. Under device ``auto``, each candidate runs on the device kind
    it was ranked (and logged) for: a CPU candidate on the CPU even where its engine
    sees a GPU."""
    log = logger if logger is not None else logging.getLogger(__name__)
    if name != "auto":
        cls = engine_class(name)
        missing = missing_libraries(cls.SPEC)
        if missing:
            raise EngineUnavailable(
                f"the {name} engine needs {', '.join(missing)}" + (f": {cls.SPEC.install}" if cls.SPEC.install else "")
            )
        if options.precision == "auto":
            options = replace(options, precision=cls.SPEC.precisions[0])
        return _build(cls, options)
    from edge_ptychonn.devices import parse_device

    choices, rejected = auto_candidates(options)
    if rejected:
        log.info("engine 'auto': not usable here: %s", "; ".join(rejected))
    any_device = parse_device(options.device).kind == "auto"
    failures = []
    for choice in choices:
        log.info("engine 'auto' chose %s", choice.reason)
        # device 'auto' would let the engine pick a GPU for a candidate ranked for the CPU
        # ('cuda' places a GPU candidate as 'auto' would; an explicit device is kept)
        chosen = replace(options, precision=choice.precision,
                         device=choice.device_kind if any_device else options.device)
        try:
            return _build(engine_class(choice.engine), chosen)
        except EngineUnavailable as exc:
            warn(log, "engine 'auto': %s %s cannot start (%s); trying the next", choice.engine, choice.precision, exc)
            failures.append(f"{choice.engine} {choice.precision}: {exc}")
    raise EngineUnavailable(
        f"engine 'auto' found nothing to run device {options.device!r} precision {options.precision!r}"
        + (f"; failed: {'; '.join(failures)}" if failures else "")
        + (f"; not usable: {'; '.join(rejected)}" if rejected else "")
    )


def _build(cls, options: EngineOptions) -> Engine:
    """``cls(options)``; on the CPU, the layout of :func:`~engines.base.cpu_layout`: with
    more than one worker, that many copies behind one :class:`~engines.workers.WorkerPool`
    (a GPU engine ignores the CPU layout, and a stand-in that computes no model, ``zero``,
    runs as one: it stands for a GPU's inference cost, where there are no workers). An
    engine that computes the model on the CPU says its layout in its ``device``, one
    worker too: ``cpu (1 worker x 2 threads)``, ``cpu (2 workers x 1 thread)``."""
    from .base import cpu_layout, cpu_layout_device

    workers, threads = cpu_layout(options.cpu_threads, options.cpu_workers, options.consumers)
    options = replace(options, cpu_threads=threads, cpu_workers=workers)
    engine = cls(options)
    if engine.device != "cpu" or not cls.SPEC.computes_model:
        return engine
    if workers <= 1:
        engine.device = cpu_layout_device(engine.device, 1, threads)
        return engine
    # the copies run where the first one does: under device 'auto' an engine that fell back to
    # the CPU (ONNX Runtime's CUDA provider failing) would try the GPU again in each copy
    options = replace(options, device="cpu")
    engines = [engine]
    try:
        while len(engines) < workers:
            engines.append(cls(options))
    except BaseException:
        for built in engines:  # each one, whatever the others do; the error that stopped the start is raised
            try:
                built.close()
            except Exception as exc:
                log.warning("closing a %s engine after a failed start also failed: %s: %s", cls.SPEC.name,
                            type(exc).__name__, exc)
        raise
    from .workers import WorkerPool

    return WorkerPool(engines, threads)
