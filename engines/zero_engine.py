"""Zero-cost engine: no network, for commissioning a chain and measuring the frame path.

``engine: zero`` returns a copy of its input batch (the identity, a deterministic
and free function of the input) as the "phase", in float32, with the model's
input shape. Everything around the network (decode, preprocessing, batching,
encode, publish, PvaPy transport) runs as with a real engine, so a consumer with
this engine shows what the frame path alone sustains: on a fast GPU, inference
costs about this little. The model file is read only for its input size.
It is never chosen by ``auto``.
"""

from __future__ import annotations

import numpy as np

from .base import PRECISIONS, EngineOptions, EngineSpec, SlotRing, Ticket, check_batch, engine_device
from .onnx_model import read_signature


class ZeroEngine:
    """Returns its input (a copy), as float32 (n, 1, H, W); computes no model."""

    SPEC = EngineSpec(
        name="zero",
        summary="identity: returns a copy of the input, no model arithmetic (commissioning, frame-path ceiling)",
        devices=("cpu",),
        precisions=PRECISIONS,  # nominal: nothing is computed, every precision is accepted
        computes_model=False,
    )
    name = "zero"
    max_in_flight = 2

    def __init__(self, options: EngineOptions):
        self.SPEC.check_precision(options.precision)
        self.device = engine_device(self.SPEC, options, n_gpus=0)
        self.precision = options.precision
        self.input_shape = read_signature(options.model_path).input_shape
        self.max_batch = options.max_batch
        self._ring = SlotRing(self.max_in_flight)
        self._results: dict[int, np.ndarray] = {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        check_batch(self, batch)
        return np.array(batch, dtype=np.float32, copy=True)

    def submit(self, batch: np.ndarray) -> Ticket:
        result = self.infer(batch)
        ticket = self._ring.acquire(len(result))
        self._results[ticket.seq] = result
        return ticket

    def collect(self, ticket: Ticket) -> np.ndarray:
        self._ring.release(ticket)
        return self._results.pop(ticket.seq)

    def close(self) -> None:
        self._results.clear()
