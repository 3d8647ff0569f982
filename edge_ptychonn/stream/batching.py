"""Fixed-size batches in preallocated buffers, flushed on timeout and at stop, order kept.

A :class:`Batcher` loads each frame (crop, bin, cast: :func:`~.preprocess.load_into`)
straight into the next free slot of a batch buffer; :meth:`Batch.prepare`
finishes the preprocessing of the whole batch at once (transform, affine), on
the inference thread, with the settings that were in force when the batch was
started (a run-time change takes effect from the next batch). A full batch is returned to the caller (who queues it for
inference); a partial batch is returned by :meth:`Batcher.flush` when it has
waited ``batch_timeout_s`` or at stop. Buffers come from a fixed pool and go
back to it through :meth:`Batcher.release` once the batch has been inferred. When
all are in use, :meth:`Batcher.add` raises :class:`NoFreeBuffer` at once: it never
waits (the caller holds a lock that the inference thread needs to give buffers
back) and never allocates; the caller drops that frame and counts it.

The batcher is not thread-safe: the caller serialises ``add`` and ``flush``
(the processor holds one lock for both). ``release`` may be called from any
thread.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np

from .frames import BadFrame, FrameMeta
from .preprocess import PreprocessConfig, RunningTotal, load_into, transform_batch


@dataclass
class Batch:
    """A batch buffer's first ``n`` frames and their metadata, in input order."""

    inputs: np.ndarray  # (batch_size, 1, H, W) float32; rows [:n] are valid
    preprocess: PreprocessConfig
    running: RunningTotal | None = None  # the consumer's running total (normalize 'running')
    metas: list[FrameMeta] = field(default_factory=list)
    first_added_s: float = 0.0
    prepared: bool = False
    # set by Batcher.add for float and 64-bit integer frames: the pixel types whose values, binned,
    # normalised and scaled within the accepted settings, can go beyond float32's range
    may_overflow: bool = False
    # after prepare(): True for each frame whose model input is not finite (float pixels near
    # float32's maximum, binned or scaled beyond it); None when every frame's is
    nonfinite: np.ndarray | None = None

    def prepare(self) -> np.ndarray:
        """The model input: the loaded frames, transformed in place (once). A frame whose
        input is not finite is set to 0 (so that it cannot disturb the engine) and marked in
        :attr:`nonfinite`: it is a bad frame, not to be published."""
        if not self.prepared:
            if self.may_overflow:
                with np.errstate(over="ignore", invalid="ignore"):  # counted per frame below
                    transform_batch(self.valid, self.preprocess, self.running)
                self._mark_nonfinite()
            else:
                transform_batch(self.valid, self.preprocess, self.running)
            self.prepared = True
        return self.valid

    def _mark_nonfinite(self) -> None:
        rows = self.valid.reshape(self.n, -1)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            rows[bad] = 0.0
            self.nonfinite = bad

    @property
    def n(self) -> int:
        return len(self.metas)

    @property
    def valid(self) -> np.ndarray:
        return self.inputs[: self.n]


class NoFreeBuffer(RuntimeError):
    """All batch buffers are in use: inference is not keeping up."""


class Batcher:
    """Preprocess frames into batches of ``batch_size`` for a model of ``input_hw``."""

    def __init__(
        self,
        batch_size: int,
        input_hw: tuple[int, int],
        preprocess: PreprocessConfig,
        n_buffers: int,
    ):
        if n_buffers < 2:
            raise ValueError(f"n_buffers must be >= 2, got {n_buffers}")
        self.batch_size = batch_size
        self.input_hw = tuple(input_hw)
        self.n_buffers = n_buffers
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(n_buffers):
            self._free.put(np.zeros((batch_size, 1, *self.input_hw), dtype=np.float32))
        self._current: Batch | None = None
        self._shape_ok: dict[tuple[int, int], str] = {}  # frame shape -> why it does not fit ("" if it does)
        self.preprocess = preprocess

    @property
    def preprocess(self) -> PreprocessConfig:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, config: PreprocessConfig) -> None:
        # normalize 'running': the mean total of this consumer's last frames. It depends on
        # the raw frames only, so it is kept across other changes (batchTimeout, offset,
        # scale, transform, another model) and starts again only when the mode or the
        # window changes.
        old = getattr(self, "_preprocess", None)
        if old is None or (old.normalize, old.normalize_window) != (config.normalize, config.normalize_window):
            self._running = RunningTotal(config.normalize_window)
        self._preprocess = config
        self._shape_ok.clear()

    def check_shape(self, frame_hw: tuple[int, int], unique_id: int) -> None:
        """Raise BadFrame('shape'), naming frame ``unique_id``, unless frames of ``frame_hw``
        become model input."""
        problem = self._shape_ok.get(frame_hw)
        if problem is None:
            pre = self._preprocess
            try:
                shape = pre.output_shape(frame_hw)
                problem = "" if shape == self.input_hw else f"it becomes {shape[0]}x{shape[1]}"
            except ValueError as exc:
                problem = str(exc)
            self._shape_ok[frame_hw] = problem
        if problem:
            pre = self._preprocess
            crop = "no crop" if pre.crop_hw is None else f"crop {list(pre.crop_hw)}" + (
                "" if pre.crop_origin_yx is None else f" at cropOrigin {list(pre.crop_origin_yx)}")
            raise BadFrame(
                "shape",
                f"frame {unique_id}: a {frame_hw[0]}x{frame_hw[1]} frame does not become the model's "
                f"{self.input_hw[0]}x{self.input_hw[1]} input with {crop} and bin {pre.bin_factor} ({problem})",
                unique_id,
            )

    @property
    def has_room(self) -> bool:
        """Whether a frame added now would find a place (the batch being filled, or a
        free buffer). Only callers holding the lock that serialises ``add`` take
        buffers, so a True stays true until that caller adds; a False may turn True
        as inference gives buffers back."""
        return self._current is not None or not self._free.empty()

    @property
    def pending(self) -> int:
        """Frames in the batch being filled."""
        return self._current.n if self._current else 0

    def age_s(self, now_s: float | None = None) -> float:
        """How long the batch being filled has waited (0 when there is none)."""
        if not self._current:
            return 0.0
        return (time.perf_counter() if now_s is None else now_s) - self._current.first_added_s

    def add(self, meta: FrameMeta, image: np.ndarray) -> Batch | None:
        """Load ``image`` into the current batch; return the batch when full.

        Raises BadFrame('shape') for frames that do not fit the model (nothing is
        added) and NoFreeBuffer, without waiting, when every buffer is in use.
        """
        self.check_shape(image.shape, meta.unique_id)
        if self._current is None:
            try:
                buffer = self._free.get_nowait()
            except queue.Empty:
                raise NoFreeBuffer(f"all {self.n_buffers} batch buffers are in use") from None
            self._current = Batch(buffer, self._preprocess, self._running, first_added_s=time.perf_counter())
        batch = self._current
        if image.dtype.kind == "f" or image.dtype.itemsize > 4:
            batch.may_overflow = True
            with np.errstate(over="ignore", invalid="ignore"):  # a binned sum beyond float32: see Batch.prepare
                load_into(image, batch.inputs[batch.n, 0], self._preprocess)
        else:
            load_into(image, batch.inputs[batch.n, 0], self._preprocess)
        batch.metas.append(meta)
        if batch.n == self.batch_size:
            self._current = None
            return batch
        return None

    def flush(self) -> Batch | None:
        """The partial batch being filled, if any (it is no longer filled)."""
        batch, self._current = self._current, None
        if batch is not None and batch.n == 0:
            self.release(batch)
            return None
        return batch

    def release(self, batch: Batch) -> None:
        """Give ``batch``'s buffer back to the pool (after inference)."""
        self._free.put(batch.inputs)
