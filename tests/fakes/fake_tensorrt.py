"""A faithful stand-in for the ``tensorrt`` Python API, 10.x or 11.x, for tests.

It offers the names and signatures of the TensorRT 10/11 Python API that an ONNX
-> plan -> run engine needs, and nothing TensorRT 10 removed (``build_engine``,
``execute_async_v2``, ``max_workspace_size``, bindings); with ``version`` 11 it
also lacks what 11 removed (``BuilderFlag.FP16``/``BF16``, the ``EXPLICIT_BATCH``
network flag). Behaviour modelled on the real library:

- ``NetworkDefinitionCreationFlag`` has TensorRT's values (``STRONGLY_TYPED`` is
  bit 1 in 10, bit 0 in 11, where it is deprecated and ignored);
  ``IOptimizationProfile.set_shape`` raises RuntimeError for inconsistent shapes;
  ``nptype`` raises TypeError for a type with no numpy equivalent (bf16);
- ``OnnxParser.parse`` returns False and keeps errors for an unreadable model,
  an operator it has no importer for, or a graph whose types its operators do
  not accept at the model's opset (strict ONNX type and shape inference: e.g.
  a bfloat16 ``Conv`` before opset 22);
- ``build_serialized_network`` returns None on failure (here: when asked to fail,
  or when a dynamic input has no optimisation profile), else a host-memory object
  (bytes) whose content names the TensorRT version and the GPU it was built on;
- ``Runtime.deserialize_cuda_engine`` returns None for bytes that are not a plan,
  or a plan of another TensorRT version or GPU;
- ``IExecutionContext``: shapes outside the profile are refused (False);
  ``execute_async_v3`` needs every I/O tensor's address and the input shape,
  captures them when called, and queues the inference on the stream whose handle
  it is given (it runs when that stream is waited for); it needs a current CUDA
  context. Outputs are computed with ONNX Runtime on the parsed graph (bf16 graphs
  with their weights rounded to bf16 and computed in fp32: ONNX Runtime has no
  CPU bf16 kernels).
- build time is simulated as ``build_delay_s`` (default 0);
- logging: ``ILogger`` is the abstract base a Python logger subclasses (its
  ``__init__`` must be called, as pybind11 requires, else TypeError at creation;
  ``Severity`` has TensorRT's five members, also reachable as ``ILogger.ERROR``
  and so on); ``Logger`` is TensorRT's own, which keeps the messages at or above
  its ``min_severity`` (here in ``messages``, where the real one prints them).
  ``Builder``, ``OnnxParser`` and ``Runtime`` refuse anything else (TypeError),
  keep the logger they are given (``.logger``; engines and execution contexts use
  their runtime's), and call its ``log(severity, msg)`` for every message,
  whatever its severity, where TensorRT would: INFO when a builder is made, a
  build starts and ends and a plan is loaded; VERBOSE for each node parsed and
  built; a WARNING when the workspace limit is under ``TACTIC_WORKSPACE_BYTES``
  (tactics skipped; the build still succeeds); an ERROR for a build that fails,
  a plan that cannot be deserialized, an input shape outside the profile and an
  ``execute_async_v3`` without its addresses or shapes.

Every call that matters is recorded in the shared ``FakeCuda.calls``.
"""

from __future__ import annotations

import importlib.machinery
import json
import time
import types

import numpy as np

MAGIC = b"FAKETRTPLAN1\n"
# the workspace the stand-in's best tactics ask for: a smaller limit skips them, with a WARNING
TACTIC_WORKSPACE_BYTES = 64 << 20


class _PybindInit(type):
    """pybind11's check for Python subclasses of a bound class: the base ``__init__`` must run."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        if not obj.__dict__.get("_base_init_called"):
            raise TypeError(f"{cls.__name__}.__init__() must be called when overriding __init__")
        return obj


def _upcast_bf16(model):
    """bf16 tensors and casts -> fp32, values kept (ONNX Runtime's CPU lacks bf16 kernels)."""
    from onnx import TensorProto, numpy_helper

    def fix(t):
        if t.data_type == TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, "<u2") if t.raw_data else np.asarray(t.int32_data, np.uint16)
            values = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
            t.CopyFrom(numpy_helper.from_array(values, t.name))

    for t in model.graph.initializer:
        fix(t)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "value":
                fix(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
    return model


def make_module(cuda_state, version: str = "10.16.1.11", build_delay_s: float = 0.0) -> types.ModuleType:
    major = int(version.split(".")[0])
    state = cuda_state
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.fail_next_build = False  # tests set this: build_serialized_network returns None once

    class _Enum:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def __int__(self):
            return self.value

        def __index__(self):
            return self.value

        def __eq__(self, other):
            return isinstance(other, _Enum) and (self.name, self.value) == (other.name, other.value)

        def __hash__(self):
            return hash((self.name, self.value))

        def __repr__(self):
            return self.name

    def enum(name, members):
        cls = type(name, (), {})
        for i, member in enumerate(members):
            setattr(cls, member, _Enum(f"{name}.{member}", i))
        return cls

    class ILogger(metaclass=_PybindInit):
        class Severity:
            pass

        def __init__(self):
            self._base_init_called = True

        def log(self, severity, msg):
            raise RuntimeError('Tried to call pure virtual function "ILogger::log"')

    for i, member in enumerate(["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"]):
        setattr(ILogger.Severity, member, _Enum(member, i))
        setattr(ILogger, member, getattr(ILogger.Severity, member))
    Severity = ILogger.Severity

    class Logger(ILogger):
        def __init__(self, min_severity=Severity.WARNING):
            ILogger.__init__(self)
            self.min_severity = min_severity
            self.messages: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(self.min_severity):
                self.messages.append(msg)

    def check_logger(owner: str, logger):
        if not isinstance(logger, ILogger):
            raise TypeError(f"{owner}.__init__(): incompatible constructor arguments; got {type(logger).__name__}, "
                            "expected tensorrt.ILogger")
        return logger

    flags = ["FP16", "BF16", "INT8", "TF32", "REFIT"] if major < 11 else ["TF32", "REFIT"]
    BuilderFlag = enum("BuilderFlag", flags)
    MemoryPoolType = enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"])
    TensorIOMode = enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    DataType = enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "BF16"])
    # the values are TensorRT's: 11 dropped EXPLICIT_BATCH (bit 0 in 10) and kept STRONGLY_TYPED, deprecated and
    # ignored (its networks always are strongly typed), as bit 0
    creation_flags = (["EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS", "PREFER_AOT_PYTHON_PLUGINS"]
                      if major < 11 else ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS", "PREFER_AOT_PYTHON_PLUGINS"])
    NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), {})
    for i, member in enumerate(creation_flags):
        setattr(NetworkDefinitionCreationFlag, member, _Enum(member, i))

    def nptype(dtype):
        mapping = {"DataType.FLOAT": np.float32, "DataType.HALF": np.float16, "DataType.INT32": np.int32,
                   "DataType.INT8": np.int8, "DataType.BOOL": np.bool_}
        if dtype.name not in mapping:  # e.g. bf16: no numpy type
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return mapping[dtype.name]

    class INetworkDefinition:
        def __init__(self, flags: int):
            self.flags = flags
            self.onnx: bytes | None = None
            self.inputs: list[tuple[str, tuple]] = []
            self.outputs: list[tuple[str, tuple]] = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return f"In node -1 (parseGraph): UNSUPPORTED_NODE: {self._desc}"

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: ILogger):
            self.network, self.logger = network, check_logger("OnnxParser", logger)
            self._errors: list[ParserError] = []

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def clear_errors(self):
            self._errors = []

        def parse(self, model: bytes, path: str | None = None) -> bool:
            import onnx

            state.record("OnnxParser.parse", len(model))
            try:
                proto = onnx.load_from_string(bytes(model))
                onnx.checker.check_model(proto)
            except Exception as exc:  # the real parser reports any failure as errors, not exceptions
                self._errors.append(ParserError(f"failed to parse the ONNX model: {exc}"))
                return False
            unknown = sorted({n.op_type for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain)})
            if unknown:
                self._errors += [ParserError(f"No importer registered for op: {op}") for op in unknown]
                return False
            try:  # types each operator accepts at this opset (bf16 Conv needs opset 22)
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
            except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
                self._errors.append(ParserError(f"type check failed: {exc}"))
                return False
            for i, node in enumerate(proto.graph.node):
                self.logger.log(Severity.VERBOSE, f"Parsing node: {node.name or f'node_{i}'} [{node.op_type}]")
            init = {t.name for t in proto.graph.initializer}

            def dims(vi):
                return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

            self.network.onnx = bytes(model)
            self.network.inputs = [(i.name, dims(i)) for i in proto.graph.input if i.name not in init]
            self.network.outputs = [(o.name, dims(o)) for o in proto.graph.output]
            return True

        def parse_from_file(self, path: str) -> bool:
            with open(path, "rb") as f:
                return self.parse(f.read(), path)

    class IOptimizationProfile:
        def __init__(self):
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, input: str, min, opt, max):
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise RuntimeError(f"profile shapes for {input} must satisfy min <= opt <= max: {lo} {mid} {hi}")
            self.shapes[input] = (lo, mid, hi)

        def get_shape(self, input: str):
            return list(self.shapes[input])

    class IBuilderConfig:
        def __init__(self):
            self.flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
            self.pools: dict = {}
            self.profiles: list[IOptimizationProfile] = []

        def set_memory_pool_limit(self, pool, pool_size: int):
            self.pools[pool] = int(pool_size)
            state.record("set_memory_pool_limit", pool.name, int(pool_size))

        def get_memory_pool_limit(self, pool):
            return self.pools.get(pool, 0)

        def set_flag(self, flag):
            self.flags.add(flag)
            state.record("set_flag", flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag)
            state.record("clear_flag", flag.name)

        def get_flag(self, flag) -> bool:
            return flag in self.flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class IHostMemory(bytes):
        @property
        def nbytes(self):
            return len(self)

    class Builder:
        def __init__(self, logger: ILogger):
            self.logger = check_logger("Builder", logger)
            self.logger.log(Severity.INFO, "[MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 20, GPU 310 (MiB)")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
            device = state.current_device()  # builds for the current context's GPU
            state.record("build_serialized_network", [f.name for f in config.flags])
            if build_delay_s:
                time.sleep(build_delay_s)
            self.logger.log(Severity.INFO, "Global timing cache in use. Profiling results in this builder pass "
                            "will be stored.")
            if trt.fail_next_build:
                trt.fail_next_build = False
                self.logger.log(Severity.ERROR, "simulated build failure")
                return None
            if network.onnx is None:
                self.logger.log(Severity.ERROR, "Network must have at least one output")
                return None
            profiles = config.profiles
            for name, dims in network.inputs:
                if -1 in dims and not any(name in p.shapes for p in profiles):
                    self.logger.log(Severity.ERROR, f"{name} has dynamic dimensions but no optimization profile")
                    return None
            for name, _ in network.outputs:
                self.logger.log(Severity.VERBOSE, f"Tactic selected for the layers ending in {name}")
            workspace = config.pools.get(MemoryPoolType.WORKSPACE, TACTIC_WORKSPACE_BYTES)
            if workspace < TACTIC_WORKSPACE_BYTES:
                self.logger.log(Severity.WARNING, f"Tactic Device request: {TACTIC_WORKSPACE_BYTES >> 20}MB Available: "
                                f"{workspace >> 20}MB. Device memory is insufficient to use tactic.")
            self.logger.log(Severity.INFO, "Engine generation completed in 0.1 seconds.")
            gpu_name, cc = state.gpus[device]
            header = {
                "version": version, "gpu": gpu_name, "cc": list(cc), "inputs": network.inputs,
                "outputs": network.outputs, "flags": sorted(f.name for f in config.flags),
                "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in profiles],
                "strongly_typed": bool(network.flags & 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
                or major >= 11,
            }
            return IHostMemory(MAGIC + json.dumps(header).encode() + b"\n" + network.onnx)

    class ICudaEngine:
        def __init__(self, header: dict, onnx_bytes: bytes, logger: ILogger):
            self.header, self.onnx_bytes, self.logger = header, onnx_bytes, logger
            self.io = [(n, d, TensorIOMode.INPUT) for n, d in header["inputs"]] + [
                (n, d, TensorIOMode.OUTPUT) for n, d in header["outputs"]
            ]
            self._session = None

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index: int) -> str:
            return self.io[index][0]

        def _find(self, name):
            for n, d, m in self.io:
                if n == name:
                    return tuple(d), m
            raise KeyError(f"no I/O tensor named {name!r}")

        def get_tensor_mode(self, name: str):
            return self._find(name)[1]

        def get_tensor_shape(self, name: str):
            return self._find(name)[0]

        def get_tensor_dtype(self, name: str):
            self._find(name)
            return DataType.FLOAT  # the engine keeps float32 I/O (Casts inside the graph)

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return [tuple(s) for s in self.header["profiles"][profile_index][name]]

        def create_execution_context(self):
            state.record("create_execution_context")
            return IExecutionContext(self)

        def session(self):
            if self._session is None:
                import onnx
                import onnxruntime as ort

                model = _upcast_bf16(onnx.load_from_string(self.onnx_bytes))
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                self._session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return self._session

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine):
            self.engine = engine
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape) -> bool:
            shape = tuple(int(x) for x in shape)
            state.record("set_input_shape", name, shape)
            dims, mode = self.engine._find(name)
            if mode != TensorIOMode.INPUT:
                self.engine.logger.log(Severity.ERROR, f"IExecutionContext::setInputShape: {name} is not an input")
                return False
            lo, _, hi = self.engine.header["profiles"][0][name] if self.engine.header["profiles"] else (dims, dims, dims)
            if len(shape) != len(dims) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                self.engine.logger.log(Severity.ERROR, f"IExecutionContext::setInputShape: Error Code 3: API Usage "
                                       f"Error ({name} dimensions {shape} are outside the profile {lo}..{hi})")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str):
            dims, mode = self.engine._find(name)
            if mode == TensorIOMode.INPUT:
                return self.shapes.get(name, dims)
            batch = next(iter(self.shapes.values()), dims)[0]
            return tuple(batch if d == -1 else d for d in dims)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            self.engine._find(name)
            state.record("set_tensor_address", name, int(memory))
            self.addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self.addresses.get(name, 0)

        def execute_async_v3(self, stream_handle: int) -> bool:
            state.current_device()
            state.record("execute_async_v3", stream_handle, dict(self.shapes))
            names = [n for n, _, _ in self.engine.io]
            if any(n not in self.addresses for n in names):
                missing = ", ".join(n for n in names if n not in self.addresses)
                self.engine.logger.log(Severity.ERROR, f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error "
                                       f"(address of tensor {missing} is not set)")
                return False
            inputs = [n for n, _, m in self.engine.io if m == TensorIOMode.INPUT]
            if any(n not in self.shapes for n in inputs):
                self.engine.logger.log(Severity.ERROR, "IExecutionContext::enqueueV3: Error Code 3: API Usage Error "
                                       "(input shapes are not all specified)")
                return False
            stream = state.streams.get(int(stream_handle))
            if stream is None:
                raise RuntimeError(f"invalid stream handle {stream_handle}")
            shapes = {n: self.shapes[n] for n in inputs}
            addresses = dict(self.addresses)  # captured now, as TensorRT does
            outputs = [n for n, _, m in self.engine.io if m == TensorIOMode.OUTPUT]
            out_shapes = {n: self.get_tensor_shape(n) for n in outputs}

            def run():
                feeds = {}
                for n in inputs:
                    count = int(np.prod(shapes[n]))
                    feeds[n] = state.buffer(addresses[n], 4 * count).view(np.float32).reshape(shapes[n]).copy()
                results = self.engine.session().run(outputs, feeds)
                for n, value in zip(outputs, results):
                    value = np.ascontiguousarray(value, np.float32)
                    assert value.shape == tuple(out_shapes[n]), (value.shape, out_shapes[n])
                    state.buffer(addresses[n], value.nbytes)[:] = value.reshape(-1).view(np.uint8)

            stream.enqueue(run)
            return True

    class Runtime:
        def __init__(self, logger: ILogger):
            self.logger = check_logger("Runtime", logger)

        def deserialize_cuda_engine(self, serialized_engine):
            device = state.current_device()
            data = bytes(serialized_engine)
            state.record("deserialize_cuda_engine", len(data))
            if not data.startswith(MAGIC):
                self.logger.log(Severity.ERROR, "deserializeCudaEngine: magic tag does not match")
                return None
            try:
                head, onnx_bytes = data[len(MAGIC):].split(b"\n", 1)
                header = json.loads(head)
            except ValueError:
                self.logger.log(Severity.ERROR, "deserializeCudaEngine: corrupt plan")
                return None
            gpu_name, cc = state.gpus[device]
            if header["version"] != version:
                self.logger.log(Severity.ERROR, f"plan built by TensorRT {header['version']}, this is {version}")
                return None
            if tuple(header["cc"]) != tuple(cc) or header["gpu"] != gpu_name:
                self.logger.log(Severity.ERROR, "plan built for another GPU")
                return None
            self.logger.log(Severity.INFO, f"Loaded engine size: {max(1, len(data) >> 20)} MiB")
            return ICudaEngine(header, onnx_bytes, self.logger)

    for name, value in dict(
        ILogger=ILogger, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        BuilderFlag=BuilderFlag, MemoryPoolType=MemoryPoolType, TensorIOMode=TensorIOMode, DataType=DataType,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, nptype=nptype, IHostMemory=IHostMemory,
        ICudaEngine=ICudaEngine, IExecutionContext=IExecutionContext, IBuilderConfig=IBuilderConfig,
        IOptimizationProfile=IOptimizationProfile, INetworkDefinition=INetworkDefinition,
    ).items():
        setattr(trt, name, value)
    return trt
