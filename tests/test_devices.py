"""Device strings: one parser for config validation and every engine; consumer -> GPU placement."""

import subprocess
import sys
from pathlib import Path

import pytest

from edge_ptychonn import devices
from edge_ptychonn.devices import DeviceRequest, DeviceUnavailable, parse_device, resolve_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("auto", DeviceRequest("auto")), ("cpu", DeviceRequest("cpu")), ("CUDA", DeviceRequest("cuda")),
    ("cuda:1", DeviceRequest("cuda", (1,))), ("cuda:0,0,1,1", DeviceRequest("cuda", (0, 0, 1, 1))),
    ("cuda:0,cuda:2", DeviceRequest("cuda", (0, 2))),
])
def test_parse(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0,,1", "", "cpu:0", 3,
                                  "cuda:\u00b2", "cuda:0,\u00b9"])  # superscripts: str.isdigit, not int()
def test_parse_refuses_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N', or a consumer-to-GPU map"):
        parse_device(text)


@pytest.mark.parametrize("processor_id, n_gpus, expected", [(1, 4, "cuda:0"), (2, 4, "cuda:1"), (5, 4, "cuda:0"),
                                                            (3, 2, "cuda:0"), (1, 0, "cpu"), (0, 2, "cuda:0")])
def test_auto_places_consumer_n_on_gpu_n_minus_1_mod_gpus(processor_id, n_gpus, expected):
    assert resolve_device("auto", processor_id, n_gpus) == expected
    if n_gpus:
        assert resolve_device("cuda", processor_id, n_gpus) == expected


def test_explicit_devices_and_maps():
    assert resolve_device("cuda:1", 7, 2) == "cuda:1"
    assert [resolve_device("cuda:0,0,1", k, 2) for k in range(1, 7)] == ["cuda:0", "cuda:0", "cuda:1"] * 2
    assert resolve_device("cpu", 3, 8) == "cpu"
    assert resolve_device("auto", 2, 4, supports_cuda=False) == "cpu"


def test_requests_that_cannot_be_met_say_why():
    with pytest.raises(DeviceUnavailable, match="'cuda:0' asked for, but the x engine sees no CUDA GPU"):
        resolve_device("cuda:0", 1, 0, engine="the x engine")
    with pytest.raises(DeviceUnavailable, match="gives consumer 2 GPU 3, but this engine sees 2 GPU"):
        resolve_device("cuda:1,3", 2, 2)
    with pytest.raises(DeviceUnavailable, match="GPUs only, not on the CPU"):
        resolve_device("cpu", 1, 1, supports_cpu=False)
    with pytest.raises(DeviceUnavailable, match="GPUs only, and none is visible"):
        resolve_device("auto", 1, 0, supports_cpu=False)
    with pytest.raises(DeviceUnavailable, match="CPU only"):
        resolve_device("cuda", 1, 2, supports_cuda=False)


def _three_gpus(monkeypatch, tmp_path) -> None:
    """The driver's folder of GPUs, as devices reads it, holds three."""
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    for i in range(3):
        (gpus / f"0000:0{i}:00.0").mkdir()
    real = devices.Path
    monkeypatch.setattr(devices, "Path", lambda p: gpus if p == "/proc/driver/nvidia/gpus" else real(p))


def test_visible_gpu_count_follows_cuda_visible_devices(monkeypatch, tmp_path):
    _three_gpus(monkeypatch, tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_gpu_count() == 3
    for value, count in [("1", 1), ("2,0", 2), ("", 0), ("0,7,1", 1), ("-1", 0), ("GPU-abc,GPU-def", 2)]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert devices.visible_gpu_count() == count, value


def test_config_validates_devices_with_the_same_parser(tmp_path):
    from edge_ptychonn.stream.config import parse_processor_args

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    config, _ = parse_processor_args({"modelPath": str(model), "device": "cuda:0,1"})
    assert config.device == "cuda:0,1"
    with pytest.raises(ValueError, match="consumer-to-GPU map"):
        parse_processor_args({"modelPath": str(model), "device": "gpu0"})


def test_devices_module_imports_no_numpy():
    import subprocess
    import sys

    code = "import sys; import edge_ptychonn.devices; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("value, count", [
    ("NoDevFiles", 0), ("none", 0),  # a batch system's "no GPU granted": CUDA sees none
    ("0,0", 0), ("1,0,1", 0), ("GPU-abc,GPU-abc", 0),  # a repeated GPU: CUDA sees none
    ("0,GPU-abc", 1), ("GPU-abc,0", 1), ("MIG-abc", 1),  # indices and ids are not mixed
    ("1gpu,2", 2), ("2x", 1),  # an index is read as far as its digits go
    ("\u00b9", 0), ("0,\u00b2", 1),  # superscripts are no index (and raised a ValueError)
])
def test_visible_gpu_count_reads_cuda_visible_devices_as_cuda_does(monkeypatch, tmp_path, value, count):
    _three_gpus(monkeypatch, tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert devices.visible_gpu_count() == count


def test_auto_loads_no_torch_where_there_is_no_nvidia_driver(tmp_path, small_model):
    """Before: ``auto`` imported torch in every consumer to ask for GPUs (seconds of start-up
    each, four consumers on two cores took 11-21 s to come up); where the machine shows no
    NVIDIA driver no library finds a GPU, so torch is not loaded to learn that. Where a driver
    shows, torch is asked."""
    script = (
        "import sys\n"
        "from edge_ptychonn import devices\n"
        f"devices.NVIDIA_DRIVER_PATHS = ({str(tmp_path / 'driver')!r},)\n"
        "from engines import EngineOptions, create_engine\n"
        f"engine = create_engine('auto', EngineOptions({str(small_model)!r}, max_batch=8))\n"
        "print(type(engine).__name__, 'torch' in sys.modules)\n"
        f"open({str(tmp_path / 'driver')!r}, 'w').close()\n"
        "from engines.torch_engine import TorchEngine\n"
        "TorchEngine.count_gpus()\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n")[:2]
    assert first.split()[1] == "False", done.stdout
    assert second == "True", done.stdout
