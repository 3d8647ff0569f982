"""PtychoNN in PyTorch, and ONNX export with a dynamic batch axis.

PtychoNN (Cherukara et al., 2020) maps one far-field diffraction pattern to the
object patch that produced it: an encoder of ``depth`` levels (two 3x3
convolutions and a 2x2 max-pool each, channels ``width * 2**level``), a decoder
that mirrors it with bilinear 2x upsampling, and a phase head
``pi * tanh(conv(x))`` giving radians in [-pi, pi]. An optional amplitude head
(``sigmoid``) shares the encoder.

``head_blocks`` (default 0: PtychoNN as published) adds residual blocks at full
resolution between the decoder and the phase head, ``x + conv(relu(conv(x)))``
with ``width`` channels: the published decoder's last nonlinearity works at half
the output resolution, which limits sharp edges. Each block's second convolution
starts at zero, so a block adds nothing until trained, and
:func:`add_head_blocks` gives a trained model blocks with its function kept.

BatchNorm after each convolution (``batch_norm=True``) lets the network learn
from scratch on simulated scans; ``export_onnx`` exports in eval mode, so the
batch statistics are fixed constants in the exported graph.

torch is imported here at module level: import this module only where torch is
wanted (training, export, the torch engine), never from the processor path.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_ptychonn.files import whole_file
from edge_ptychonn.model_card import ModelConfig  # the architecture, as the model card records it

ONNX_OPSET = 17
INPUT_NAME = "diffraction"
PHASE_NAME = "phase"
AMPLITUDE_NAME = "amplitude"


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return layers


def _head_block(width: int, batch_norm: bool) -> nn.Sequential:
    """conv-(BatchNorm)-ReLU-conv; the second convolution starts at zero, so the block adds nothing yet."""
    first = [nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm)] + ([nn.BatchNorm2d(width)] if batch_norm else [])
    block = nn.Sequential(*first, nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1))
    nn.init.zeros_(block[-1].weight)
    nn.init.zeros_(block[-1].bias)
    return block


class PtychoNN(nn.Module):
    """Diffraction intensity (N, 1, H, W) -> phase (N, 1, H, W) [, amplitude]."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        w, d, bn = config.width, config.depth, config.batch_norm
        enc: list[nn.Module] = []
        c_in = 1
        for level in range(d):
            c_out = w * 2**level
            enc += _conv_block(c_in, c_out, bn)
            enc.append(nn.MaxPool2d(2))
            c_in = c_out
        self.encoder = nn.Sequential(*enc)
        self.phase_decoder = self._decoder(c_in)
        # registered between decoder and head: modules() follows the graph's order (none: no weights)
        self.phase_blocks = nn.ModuleList(_head_block(w, bn) for _ in range(config.head_blocks))
        self.phase_head = nn.Conv2d(w, 1, 3, padding=1)
        if config.amplitude_head:
            self.amplitude_decoder = self._decoder(c_in)
            self.amplitude_head = nn.Conv2d(w, 1, 3, padding=1)

    def _decoder(self, c_in: int) -> nn.Sequential:
        w, d, bn = self.config.width, self.config.depth, self.config.batch_norm
        dec: list[nn.Module] = []
        for level in reversed(range(d)):
            c_out = w * 2**level
            dec += _conv_block(c_in, c_out, bn)
            dec.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            c_in = c_out
        return nn.Sequential(*dec)

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        features = self.phase_decoder(z)
        for block in self.phase_blocks:
            features = features + block(features)
        phase = math.pi * torch.tanh(self.phase_head(features))
        if not self.config.amplitude_head:
            return phase
        amplitude = torch.sigmoid(self.amplitude_head(self.amplitude_decoder(z)))
        return phase, amplitude


def build_model(config: ModelConfig = ModelConfig(), seed: int | None = 0) -> PtychoNN:
    """A PtychoNN with deterministic initial weights when ``seed`` is given."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PtychoNN(config)
    return PtychoNN(config)


def export_onnx(model: PtychoNN, path: str | Path) -> Path:
    """Export in eval mode to ONNX (opset 17) with a dynamic batch axis.

    Input ``diffraction`` float32 (N, 1, H, W); outputs ``phase`` and, with an
    amplitude head, ``amplitude``, both float32 (N, 1, H, W). The file takes its
    name only when whole (``files.whole_file``): a reader never loads half a model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole_file(path) as partial:
        _export(model, partial)
    return path


def _export(model: PtychoNN, path: Path) -> None:
    size = model.config.input_size
    outputs = [PHASE_NAME] + ([AMPLITUDE_NAME] if model.config.amplitude_head else [])
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(2, 1, size, size, device=next(model.parameters()).device)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            opset_version=ONNX_OPSET,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            dynamo=False,
        )
    finally:
        model.train(was_training)
    _inline_shared_initializers(path)


def _inline_shared_initializers(path: Path) -> None:
    """Replace ``Identity(initializer)`` nodes by initializers of their own.

    The exporter shares identical weights (e.g. the zero biases left by folded
    BatchNorm) through Identity nodes; converters and engines that expect a
    convolution's weights to be initializers (onnx2torch, TensorRT refitting)
    then fail. The file grows by the duplicated tensors only.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(initializers[node.input[0]])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))


_LOADABLE_OPS = {"Conv", "Relu", "MaxPool", "Resize", "Upsample", "Tanh", "Sigmoid", "Mul", "Add", "Constant",
                 "Identity"}


def from_onnx(path: str | Path) -> PtychoNN:
    """Rebuild a PtychoNN (eval mode, fp32) from an exported ONNX file.

    Works for graphs of this architecture: the project's own exports (BatchNorm
    folded into the convolutions) and PtychoNN models of the same layout from
    elsewhere (e.g. edgePtychoNN's: conv-ReLU blocks, max-pool, bilinear
    upsampling, ``pi * tanh`` phase head). The layout (width, depth, input size,
    amplitude head, head blocks: one residual ``Add`` each) is read from the
    graph; each convolution's weights are copied in graph order after checking
    its shape. Anything else raises ``ValueError`` saying what did not match.
    """
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...: all mean "not a model"
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from None
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = {n.op_type for n in graph.node}
    if not ops <= _LOADABLE_OPS:
        raise ValueError(f"{path}: operators {sorted(ops - _LOADABLE_OPS)} are not part of PtychoNN")
    for node in graph.node:
        if node.op_type in ("Resize", "Upsample"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("mode", b"nearest")
            if mode not in (b"linear", b"bilinear"):
                raise ValueError(f"{path}: upsampling mode {mode!r}; PtychoNN upsamples bilinearly")
            # where output pixels sample the input: Upsample and Resize before opset 11 are 'asymmetric'
            grid = (attrs.get("coordinate_transformation_mode", b"half_pixel")
                    if node.op_type == "Resize" and opset >= 11 else b"asymmetric")
            if grid not in (b"half_pixel", b"pytorch_half_pixel"):  # the same for PtychoNN's 2x upsampling
                raise ValueError(f"{path}: upsampling with coordinate_transformation_mode {grid.decode()!r}; "
                                 "PtychoNN's upsampling uses half-pixel centres (PyTorch align_corners=False)")
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # constants and shared weights given as nodes
        if node.op_type == "Constant":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs or convs[0].input[1] not in weights:
        raise ValueError(f"{path}: no convolution weights found")
    first = weights[convs[0].input[1]]
    data_input = next(i for i in graph.input if i.name not in weights)
    dims = [d.dim_value for d in data_input.type.tensor_type.shape.dim]
    depth = sum(n.op_type == "MaxPool" for n in graph.node)
    if not depth:
        raise ValueError(f"{path}: no MaxPool, so not PtychoNN's encoder-decoder")
    config = ModelConfig(
        width=int(first.shape[0]),
        depth=depth,
        input_size=int(dims[-1]),
        batch_norm=False,
        amplitude_head=len(graph.output) == 2,
        head_blocks=sum(n.op_type == "Add" for n in graph.node),
    )
    for node in graph.node:
        if node.op_type == "Mul":
            factors = [weights[i] for i in node.input if i in weights]
            if factors and not np.allclose(factors[0], math.pi, rtol=1e-5):
                raise ValueError(f"{path}: phase head scales tanh by {factors[0]}, PtychoNN by pi")
    model = PtychoNN(config).eval()
    modules = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(modules) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions, a PtychoNN of {config} has {len(modules)}")
    with torch.no_grad():
        for module, node in zip(modules, convs):
            w = weights[node.input[1]]
            if tuple(w.shape) != tuple(module.weight.shape):
                raise ValueError(f"{path}: convolution {node.name or node.output[0]} has weights {w.shape}, expected {tuple(module.weight.shape)}")
            module.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            bias = weights[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32)
            module.bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32)))
    # the graph's output names in the order the module returns them (phase, then amplitude): a graph may
    # list its outputs the other way round; the amplitude is the one a Sigmoid makes
    names = [o.name for o in graph.output]
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    if len(names) == 2 and made_by.get(names[0]) == "Sigmoid" and made_by.get(names[1]) != "Sigmoid":
        names.reverse()
    model.onnx_outputs = tuple(names)
    return model


def widen(model: PtychoNN, width: int, seed: int = 0) -> PtychoNN:
    """A PtychoNN of ``width`` (at least ``model``'s) that computes what ``model`` computes.

    Function-preserving widening (Net2WiderNet, Chen et al. 2016): every channel
    beyond the old count is a copy of a randomly chosen old channel of the same
    layer (its convolution weights and bias, and its BatchNorm parameters and
    statistics), and the next convolution's weights of an old channel are split
    over that channel and its copies in random shares that add up to one. The
    output is the same (in eval mode, and in training mode, where copies see the
    same batch statistics), and the uneven shares give the copies different
    gradients, so that training separates them. Same architecture otherwise;
    ``ValueError`` for a smaller width, or a model with head blocks (widen
    first, then :func:`add_head_blocks`).
    """
    config = model.config
    if width < config.width:
        raise ValueError(f"cannot widen a width-{config.width} model to width {width}")
    if config.head_blocks and width != config.width:
        raise ValueError("cannot widen a model with head blocks; widen one without, then add them")
    rng = np.random.default_rng(seed)
    wide = PtychoNN(replace(config, width=width)).train(model.training)

    def layers(*seqs):
        return [m for s in seqs for m in s if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]

    def copy_path(old: list, new: list, in_map):
        """Copy the widened weights of one chain of conv (+ BatchNorm) layers; the channel map of its output."""
        i = 0
        while i < len(old):
            conv_o, conv_n = old[i], new[i]
            w = conv_o.weight
            if in_map is not None:
                share = np.ones(len(in_map))
                for c in range(w.shape[1]):
                    copies = np.nonzero(in_map == c)[0]
                    if len(copies) > 1:
                        share[copies] = rng.dirichlet(np.full(len(copies), 4.0))
                w = w[:, in_map] * torch.from_numpy(share.astype(np.float32))[None, :, None, None]
            n_old, n_new = conv_o.weight.shape[0], conv_n.weight.shape[0]
            extra = rng.choice(n_old, n_new - n_old, replace=n_new - n_old > n_old)
            out_map = np.concatenate([np.arange(n_old), extra]).astype(np.int64)
            conv_n.weight.copy_(w[out_map])
            if conv_o.bias is not None:
                conv_n.bias.copy_(conv_o.bias[out_map])
            if i + 1 < len(old) and isinstance(old[i + 1], nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new[i + 1], name).copy_(getattr(old[i + 1], name)[out_map])
                i += 1
            in_map = out_map
            i += 1
        return in_map

    with torch.no_grad():
        encoded = copy_path(layers(model.encoder), layers(wide.encoder), None)
        copy_path(layers(model.phase_decoder, [model.phase_head]), layers(wide.phase_decoder, [wide.phase_head]), encoded)
        if config.amplitude_head:
            copy_path(layers(model.amplitude_decoder, [model.amplitude_head]),
                      layers(wide.amplitude_decoder, [wide.amplitude_head]), encoded)
    return wide


def add_head_blocks(model: PtychoNN, head_blocks: int) -> PtychoNN:
    """A PtychoNN with ``head_blocks`` (at least ``model``'s) that computes what ``model`` computes:
    ``model``'s weights, and new head blocks whose second convolution is zero (they add
    nothing until trained). ``ValueError`` for fewer blocks than ``model`` has."""
    config = model.config
    if head_blocks < config.head_blocks:
        raise ValueError(f"cannot remove head blocks: the model has {config.head_blocks}, asked for {head_blocks}")
    grown = PtychoNN(replace(config, head_blocks=head_blocks)).train(model.training)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("phase_blocks.") for k in missing), (missing, unexpected)
    return grown
