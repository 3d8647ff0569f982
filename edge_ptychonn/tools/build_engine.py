"""``edge-ptychonn build-engine``: build TensorRT plans ahead of time, so consumers start in seconds.

A plan is valid for one TensorRT version, GPU model (name and compute capability),
ONNX file, batch profile and precision; the TensorRT engine finds it in the plan
cache by that key (``planCacheDir``, default ``~/.cache/edge-ptychonn/tensorrt``)
and builds only what is missing. Run this once per host (and after changing the
model, TensorRT or the GPU) with the consumers' ``batchSize`` and ``precision``.
GPUs of the same model share one plan. Needs TensorRT and pycuda (``pip install
'edge-ptychonn[gpu]'``) and an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge_ptychonn.files import check_folder


def _precisions(text: str) -> list[str]:
    from engines.tensorrt_engine import TensorRTEngine

    words = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not words:  # nothing to build would look like success
        raise argparse.ArgumentTypeError(f"give at least one precision, got {text!r}")
    offered = TensorRTEngine.SPEC.precisions
    unknown = [w for w in words if w not in offered]
    if unknown:  # a typo found now, not after building the others (minutes each)
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not a precision; give some of {', '.join(offered)}")
    return words


def get_args_parser(prog: str = "edge-ptychonn build-engine") -> argparse.ArgumentParser:
    from edge_ptychonn.model_card import default_model_path
    from engines.tensorrt_engine import default_plan_cache_dir

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=default_model_path(),
                        help="ONNX model (the consumers' modelPath)")
    parser.add_argument("--batch", type=int, default=8, help="the consumers' batchSize: the profile covers 1..batch")
    parser.add_argument("--precision", type=_precisions, default="fp32,fp16",  # argparse applies the type
                        help="comma-separated precisions: fp32, tf32, fp16, bf16")
    parser.add_argument("--device", default="all",
                        help="'all' (every visible GPU), or a device string such as 'cuda:0' or 'cuda:0,1'")
    parser.add_argument("--plan-cache-dir", type=Path, default=default_plan_cache_dir(), help="the consumers' planCacheDir")
    return parser


def _check_device(device: str):
    """The parsed ``--device`` (None for 'all'); ``ValueError`` for one that names no GPU (checked
    before TensorRT is looked for: a bad argument whether or not it is installed)."""
    from edge_ptychonn.devices import parse_device

    if device == "all":
        return None
    request = parse_device(device)
    if request.kind == "cpu":
        raise ValueError("TensorRT plans are built for GPUs, not the CPU")
    return request


def _gpus(device: str) -> list[str]:
    from engines.tensorrt_engine import TensorRTEngine

    request = _check_device(device)
    n = TensorRTEngine.count_gpus()
    if request is None:
        return [f"cuda:{i}" for i in range(n)]
    indices = request.indices or tuple(range(n))
    return [f"cuda:{i}" for i in dict.fromkeys(indices)]


def main(args: argparse.Namespace) -> int:
    from engines import EngineOptions, EngineUnavailable
    from engines.onnx_model import read_signature
    from engines.registry import engine_class, missing_libraries

    if not args.model.is_file():  # a bad argument
        print(f"edge-ptychonn build-engine: model {args.model} not found", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 256:  # the consumers' batchSize range
        print(f"edge-ptychonn build-engine: --batch must be 1..256 (the consumers' batchSize), got {args.batch}",
              file=sys.stderr)
        return 2
    try:
        fixed = read_signature(args.model).fixed_batch  # a model exported at one batch: its plan is for that batch
    except ValueError as exc:  # not an ONNX model of one (N, 1, H, W) input
        print(f"edge-ptychonn build-engine: {exc}", file=sys.stderr)
        return 2
    try:
        _check_device(args.device)
    except ValueError as exc:
        print(f"edge-ptychonn build-engine: --device: {exc}", file=sys.stderr)
        return 2
    try:  # before a build of minutes: the plans are what this command is for
        check_folder(args.plan_cache_dir)
    except OSError as exc:
        print(f"edge-ptychonn build-engine: cannot save plans in --plan-cache-dir {args.plan_cache_dir}: {exc}",
              file=sys.stderr)
        return 2
    cls = engine_class("tensorrt")
    missing = missing_libraries(cls.SPEC)
    if missing:
        print(f"edge-ptychonn build-engine: needs {', '.join(missing)}: {cls.SPEC.install}", file=sys.stderr)
        return 1
    try:
        gpus = _gpus(args.device)
    except ValueError as exc:
        print(f"edge-ptychonn build-engine: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # pycuda cannot start (no driver, no device): one line, not a traceback
        print(f"edge-ptychonn build-engine: cannot count the GPUs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not gpus:
        print("edge-ptychonn build-engine: no NVIDIA GPU visible", file=sys.stderr)
        return 1
    batches = f"batch {fixed} (fixed by the model)" if fixed else f"batch 1..{args.batch}"
    failed = 0
    for device in gpus:
        for precision in args.precision:
            t0 = time.perf_counter()
            try:
                engine = cls(EngineOptions(model_path=args.model, device=device, precision=precision,
                                           max_batch=args.batch, plan_cache_dir=args.plan_cache_dir))
            except (EngineUnavailable, ValueError) as exc:
                print(f"{device} {precision}: FAILED: {exc}", file=sys.stderr)
                failed += 1
                continue
            engine.close()
            if engine.plan_source.endswith("not cached"):  # built, but the plan cache folder is not writable
                print(f"{device} {precision}: FAILED: the plan was built but cannot be saved in "
                      f"{args.plan_cache_dir} (not writable; see the warning above)", file=sys.stderr)
                failed += 1
                continue
            print(f"{engine.device} {precision} {batches}: {engine.plan_source} "
                  f"in {time.perf_counter() - t0:.1f} s -> {engine.plan_path}")
    return 1 if failed else 0
