"""edge-ptychonn finetune: the shipped model fine-tuned on a foreign object family.

The "beamline" data: a simulated scan of the ``siemens`` family (unlike the
training family), its frames recorded by the chain's HDF5 writer (its own
``process()`` fed real NTNDArrays with ``PosY``/``PosX`` attributes, as the
writer attached to the detector channel records them), and a "reconstruction"
that is the ground-truth object plus complex noise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pvaccess as pva
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from frames_util import good_frame  # noqa: E402

from edge_ptychonn import cli  # noqa: E402
from edge_ptychonn.model_card import default_model_path, load_card  # noqa: E402
from edge_ptychonn.science import accuracy, finetune  # noqa: E402
from edge_ptychonn.science.simulate import save_scan, simulate_scan  # noqa: E402
from edge_ptychonn.science.train import training_device  # noqa: E402
from processors.hdf5_writer import Hdf5WriterProcessor  # noqa: E402

FRAMEWORK = {"processorId": 1, "inputChannel": "ad:image", "outputChannel": "", "objectIdField": "uniqueId",
             "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}


def record_hdf5(directory, frames, positions, model_id=None, **args):
    """Frames written by the HDF5 writer's own code path, positions (and a ``model_id``, as
    PtychoNNProcessor's outputs carry it) as frame attributes; ``args``: the writer's."""
    framework = {**FRAMEWORK, "inputChannel": "inference:1:output"} if model_id else FRAMEWORK
    writer = Hdf5WriterProcessor({**framework, "outputDirectory": str(directory), **args})
    writer.start()
    for k, (image, (y, x)) in enumerate(zip(frames, positions)):
        pv = good_frame(k + 1, image)
        pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(float(y))),
                           pva.NtAttribute("PosX", pva.PvDouble(float(x)))] + (
            [pva.NtAttribute("modelId", pva.PvString(model_id))] if model_id else [])
        writer.process(pv)
    writer.stop()
    assert writer.getStats()["nFramesWritten"] == len(frames)
    [path] = writer.files
    return path


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    """A siemens-star scan with the shipped model's probe and photons: frames, truth, files."""
    d = tmp_path_factory.mktemp("finetune")
    settings = accuracy.held_out_settings(load_card(default_model_path()), seed=4242, family="siemens", n_positions=400)
    frames, truth = simulate_scan(settings, progress=False)
    npy, npz = save_scan(d / "scan", frames, truth)
    rng = np.random.default_rng(5)
    obj = truth.object_amplitude * np.exp(1j * truth.object_phase)
    obj = obj + 0.02 * (rng.standard_normal(obj.shape) + 1j * rng.standard_normal(obj.shape))
    np.save(d / "recon.npy", obj.astype(np.complex64))
    return {"dir": d, "frames": frames, "truth": truth, "npy": npy, "npz": npz, "recon": d / "recon.npy",
            "h5": record_hdf5(d / "h5", frames, truth.positions_px)}


def run_cli(*argv):
    return cli.main(["finetune", *map(str, argv)])


def test_finetune_lowers_the_held_out_error_and_writes_a_runnable_model(beamline, tmp_path, capsys):
    out = tmp_path / "site"
    rc = run_cli("--frames", beamline["h5"], "--object", beamline["recon"], "--out", out, "--epochs", 1, "--batch-size",
                 8, "--max-minutes", 0, "--device", "cpu", "--quiet")  # 32 steps, whatever the machine's speed
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"positions from {beamline['h5']}:positions" in captured.err  # the writer's positions dataset
    card = load_card(out.with_suffix(".onnx"))
    shipped = load_card(default_model_path())
    assert card.preprocess == shipped.preprocess and card.stitch == shipped.stitch
    assert card.training.n_val_frames == 80 and card.training.steps > 0 and card.model.batch_norm
    scores = card.accuracy["finetune"]
    before, after = scores["held_out_before"], scores["held_out_after"]
    # lr 0 (a training that changes nothing but the BatchNorm statistics) stays within 4 % of
    # the start (README, "Fine-tuning on your own reconstructions"); the margins are far from that
    assert after["mean_abs_error_rad"] < 0.8 * before["mean_abs_error_rad"], (before, after)
    assert after["patch_rmse_median_rad"] < 0.95 * before["patch_rmse_median_rad"], (before, after)
    assert after["stitched_ssim"] > before["stitched_ssim"] + 0.05, (before, after)
    assert "Held-out accuracy" in out.with_suffix(".md").read_text() and out.with_suffix(".pt").is_file()
    # the shipped card's output mask goes with the model (the recording's probe is its training probe)
    assert shipped.output_mask is not None and card.output_mask == shipped.output_mask
    md = out.with_suffix(".md").read_text()
    assert "normalize `running`" in md and "in fine-tuning, over the mean total of the recorded frames" in md
    assert "Output mask (`output_mask`)" in md

    engine = accuracy.open_engine(out.with_suffix(".onnx"), "onnxruntime", device="cpu", batch_size=8)
    try:
        phase = accuracy.predict(engine, beamline["frames"][-8:], card.preprocess)
    finally:
        engine.close()
    assert phase.shape == (8, 128, 128) and np.isfinite(phase).all()

    # the checkpoint beside it (a later fine-tune's --init-from) holds the same network, with BatchNorm
    model, config, pt_card, pp = finetune.load_base(out.with_suffix(".pt"))
    assert config.batch_norm and pp == card.preprocess and pt_card == card
    from edge_ptychonn.stream.preprocess import preprocess

    with torch.no_grad():
        got = model(torch.from_numpy(preprocess(beamline["frames"][-8:], pp))[:, None]).numpy()[:, 0]
    np.testing.assert_allclose(got, phase, atol=2e-4)

    # An iterative code's phase is known up to a constant, which the base model (trained with one constant
    # per scan removed) never learnt: the loss and the mean error remove one too. Before, finetune trained
    # and scored absolute phase (a cells scan with the exact truth: "mean |phase error| 0.399 -> 0.082 rad"
    # while the stitched SSIM fell 0.751 -> 0.626). The same reconstruction shifted by 1 rad now scores the
    # base model as the unshifted one does, and trains alike (float16 targets round a little differently).
    shifted = tmp_path / "shifted.npy"
    np.save(shifted, (np.load(beamline["recon"]) * np.exp(1j)).astype(np.complex64))
    assert run_cli("--frames", beamline["h5"], "--object", shifted, "--out", tmp_path / "shifted", "--epochs", 1,
                   "--batch-size", 8, "--max-minutes", 0, "--device", "cpu", "--quiet") == 0, capsys.readouterr().err
    moved = load_card(tmp_path / "shifted.onnx").accuracy["finetune"]
    assert moved["held_out_before"]["mean_abs_error_rad"] == pytest.approx(before["mean_abs_error_rad"], abs=1e-3)
    for key in ("mean_abs_error_rad", "patch_rmse_median_rad"):
        assert moved["held_out_after"][key] == pytest.approx(after[key], rel=0.05), (key, moved, after)


def test_the_shipped_onnx_loads_into_the_torch_model_with_its_outputs(beamline):
    model, config, card, pp = finetune.load_base(default_model_path())
    assert config.input_size == 128 and not config.batch_norm  # folded into the convolutions
    frames = beamline["frames"][:4]
    engine = accuracy.open_engine(default_model_path(), "onnxruntime", device="cpu", batch_size=4)
    try:
        expected = accuracy.predict(engine, frames, pp)
    finally:
        engine.close()
    from edge_ptychonn.stream.preprocess import preprocess

    x = torch.from_numpy(preprocess(frames, pp))[:, None]
    with torch.no_grad():
        got = model(x).numpy()[:, 0]
    np.testing.assert_allclose(got, expected, atol=2e-4)

    # BatchNorm put back with the statistics of these frames: the same function in eval mode,
    # nearly the same in train mode (batch statistics of the same frames)
    unfolded = finetune.unfold_batchnorm(model, beamline["frames"][:16], pp)
    assert unfolded.config.batch_norm and sum(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules()) == 16
    with torch.no_grad():
        np.testing.assert_allclose(unfolded.eval()(x).numpy()[:, 0], got, atol=2e-4)
        from edge_ptychonn.science.train import scan_factors, training_inputs

        f16 = beamline["frames"][:16]  # the inputs training gives (and the statistics were taken of)
        x16 = torch.from_numpy(training_inputs(f16, pp, scan_factors(f16, 16, pp)))[:, None]
        np.testing.assert_allclose(unfolded.train()(x16).numpy(), unfolded.eval()(x16).numpy(), atol=0.02)


def test_batchnorm_statistics_are_those_of_the_training_inputs_whatever_the_batches(beamline):
    """With ``normalize: running`` each batch of 32 in the statistics pass started a running
    mean of its own: the first frames of every batch were scaled by their own totals, unlike the
    inputs training then gave the same model (the recording's mean total)."""
    from edge_ptychonn.science.train import scan_factors, training_inputs

    model, config, card, pp = finetune.load_base(default_model_path())
    assert pp.normalize == "running"
    frames = beamline["frames"][:48]

    def means(unfolded):
        return [m.running_mean.numpy().copy() for m in unfolded.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    small, whole = (means(finetune.unfold_batchnorm(model, frames, pp, batch_size=b)) for b in (4, 48))
    for a, b in zip(small, whole):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and they are the statistics of what training feeds the model: the first convolution's
    # mean output over the training inputs, less its bias
    x = torch.from_numpy(training_inputs(frames, pp, scan_factors(frames, len(frames), pp)))[:, None]
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        expected = (first(x) - first.bias[None, :, None, None]).double().mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(whole[0], expected, rtol=1e-4, atol=1e-5)


def test_positions_from_the_simulator_an_npy_and_a_uniqueid_table(beamline, tmp_path):
    truth = beamline["truth"]
    ids = np.arange(1, len(truth.positions_px) + 1)
    np.testing.assert_array_equal(finetune.load_positions(beamline["npz"], ids), truth.positions_px)
    # a text table in another order, in metres (pixel 10 nm) and of the probe centre, matched by uniqueId
    order = np.random.default_rng(0).permutation(len(ids))
    centre_m = (truth.positions_px + 64) * 10e-9
    table = tmp_path / "pos.txt"
    np.savetxt(table, np.column_stack([ids[order], centre_m[order]]), header="uniqueId y x")
    pos = finetune.load_positions(table, ids[::-1])
    corners = finetune.to_object_pixels(pos, size=128, object_shape=truth.object_phase.shape, pixel_size=10e-9,
                                        reference="centre")
    np.testing.assert_array_equal(corners, truth.positions_px[::-1])
    with pytest.raises(finetune.InputError, match="no position for 1 of 400 frames .uniqueIds 401"):
        finetune.load_positions(table, ids + 1)


def test_a_text_table_may_name_its_columns(tmp_path):
    """A CSV with a header row (``uniqueId,x,y``: common) was refused as unreadable; its names
    now say which column is which, in any order; names that do not are refused in one line."""
    ids = np.array([1, 2, 3])
    yx = np.array([[10.0, 20.0], [11.0, 21.0], [12.0, 22.0]])
    named = tmp_path / "pos.csv"
    named.write_text("# from the scan log\nuniqueId, X, y\n" + "".join(f"{u},{x},{y}\n" for u, (y, x) in zip(ids, yx)))
    np.testing.assert_array_equal(finetune.load_positions(named, ids[::-1]), yx[::-1])
    plain = tmp_path / "pos.txt"
    plain.write_text("x y\n" + "".join(f"{x} {y}\n" for y, x in yx))
    np.testing.assert_array_equal(finetune.load_positions(plain, ids), yx)
    # the README's scan_positions.txt with commas, and a .csv of white space, were refused: any text
    # table reads both (one reader with the live stitcher's positionsFile)
    commas = tmp_path / "scan_positions.txt"
    commas.write_text("uniqueId,x,y\n" + "".join(f"{u},{x},{y}\n" for u, (y, x) in zip(ids, yx)))
    np.testing.assert_array_equal(finetune.load_positions(commas, ids), yx)
    spaces = tmp_path / "spaces.csv"
    spaces.write_text("".join(f"{y}  {x}\n" for y, x in yx))
    np.testing.assert_array_equal(finetune.load_positions(spaces, ids), yx)
    ragged = tmp_path / "ragged.dat"
    ragged.write_text("1 2\n3\n")
    with pytest.raises(finetune.InputError, match="line 2 is not a row of 2 numbers like the first: '3'"):
        finetune.load_positions(ragged, ids[:2])
    unnamed = tmp_path / "bad.csv"
    unnamed.write_text("id,a,b\n1,2,3\n")
    with pytest.raises(finetune.InputError, match="must name the columns y and x .* got 'id,a,b'"):
        finetune.load_positions(unnamed, ids[:1])


def test_held_out_block_and_guard_band(beamline):
    truth = beamline["truth"]
    corners = truth.positions_px.astype(np.int64)
    bright = np.zeros((128, 128), bool)
    bright[44:84, 44:84] = True
    train, val, n_guard = finetune.held_out_split(corners, bright, 0.2)
    np.testing.assert_array_equal(val, np.arange(320, 400))  # the last rows of the raster
    assert n_guard > 0 and len(train) + n_guard == 320
    lo = corners + 44
    apart = ((lo[train, None] + 40 <= lo[None, val]) | (lo[None, val] + 40 <= lo[train, None])).any(axis=2)
    assert apart.all()  # no training bright centre overlaps a held-out one
    kept = np.setdiff1d(np.arange(320), train)  # and every frame left out touches one
    touches = ~((lo[kept, None] + 40 <= lo[None, val]) | (lo[None, val] + 40 <= lo[kept, None])).any(axis=2)
    assert touches.any(axis=1).all()


@pytest.mark.parametrize("case, message", [
    ("count", "400 frames but 399 positions"),
    ("outside", r"positions put the 128x128 patch outside the \d+x\d+ object .first: uniqueId \d+, frame \d+, corner"),
    ("real_object", "must be a complex array .* got float32; for a phase map save np.exp"),
    ("npz_without_object", "no 'object' array"),
    ("flat_frames", "frames must be a stack .N, H, W., got shape .128, 128."),
    ("complex_frames", "frames must be integer or float counts, got complex64"),
    ("nan_frames", "1 frames hold NaN or infinite pixels"),
    ("no_positions", "holds no positions: give --positions"),
    ("unknown_filter", "cannot read the frames .* needs hdf5plugin: pip install 'edge-ptychonn\\[hdf5\\]'"),
    ("data_group", "no data dataset; expected the layout of processors/hdf5_writer.py"),
    ("frame_size", r"frames of 64x64 become 64x64 with no crop and bin 1 \(the base model's\); the model takes "
                   r"128x128: give the detector's crop and bin with --crop H W"),
    ("overwrite_base", "would overwrite the base model"),
    ("threads", "threads must be >= 1, got 0"),
    ("max_minutes", r"max-minutes must be a number >= 0 .0: no limit., got nan"),
    # files that hold no arrays (a copy still running, a wrong name): before, EOFError, AttributeError tracebacks
    ("empty_frames", r"empty.npy: not a numpy array file \(the file is empty\)"),
    ("npz_frames", r"scan.npz.npy: an .npz archive, not a .npy array"),
    ("empty_positions", r"empty.npz: not an .npz archive of numpy arrays \(the file is empty\)"),
    ("npz_positions", r"pos.npy: an .npz archive, not a .npy array"),
    ("empty_object", r"empty.npy: not a numpy array file \(the file is empty\)"),
    ("npz_object", r"recon.npy: an .npz archive, not a .npy array"),
    ("empty_probe", r"empty.npy: not a numpy array file \(the file is empty\)"),
    # a base whose card is another model's: before, its preprocessing was used without a word
    ("other_card", r"the model card .*base.json says input_size 64, but the model takes 128x128 input: it is "
                   r"another model's card"),
    # an HDF5 file whose positions do not fit its frames: before, the first 10 frames were used without a word,
    # or numpy's broadcasting error, or a TypeError traceback
    ("short_positions", r"short.h5: positions must be a dataset \(n, 2\) of y x, a row for each of the 4 frames; "
                        r"got shape \(3, 2\): give --positions"),
    ("flat_positions", r"flat.h5: positions must be .* got shape \(4,\): give --positions"),
    ("group_positions", r"group_pos.h5: positions must be .* got a group: give --positions"),
    ("card_scan_settings", r"the model card of .*base.onnx: training.scan_settings: frame_size must be a whole number, "
                           r"got 128.0"),  # before: a TypeError traceback
    # an HDF5 file with fewer frames than uniqueIds: before, an IndexError traceback after the model was loaded;
    # uniqueIds not a 1-D list of whole numbers: before, "too many values to unpack", or cast without a word
    ("short_data", r"short_data.h5: 4 uniqueIds but data holds 3 frames; expected a frame for each uniqueId"),
    ("uid_2d", r"uid_2d.h5: uniqueId must be a 1-D dataset of whole numbers, got int64 \(4, 1\)"),
    ("uid_float", r"uid_float.h5: uniqueId must be a 1-D dataset of whole numbers, got float64 \(4,\)"),
    # a recording of zeros (a detector that was off): before, the model was fine-tuned on it without a word
    ("zero_frames", r"zeros.npy: every frame is zero everywhere: no diffraction recorded"),
    # a text table without rows: before, numpy's UserWarning with a source line, then the shape (0, 1)
    ("empty_text_positions", r"^edge-ptychonn finetune: \S*empty.txt: holds no positions \(no rows of numbers\)\n$"),
    # the writer's file of an inference output (float32 phase images): before, trained on as diffraction, exit 0
    ("model_outputs", r"^edge-ptychonn finetune: \S*inference_1_output_scan0001.h5 holds a model's outputs \(frames "
                      r"of 'inference:1:output' made by 'ptychonn sha256:1a2b3c4d5e6f'\), not diffraction frames; "
                      r"the raw frames are recorded by processors/hdf5_writer.py on the detector channel: give that "
                      r"file\n$"),
    ("old_model_outputs", r"^edge-ptychonn finetune: \S*old.h5 holds a model's outputs \(frames of "
                          r"'inference:1:output', written with a modelCard\), not diffraction frames; the raw frames "
                          r"are recorded by processors/hdf5_writer.py on the detector channel: give that file\n$"),
])
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(beamline, tmp_path, capsys, case, message):
    d = beamline
    frames, positions, obj = d["npy"], d["npz"], d["recon"]
    extra = []
    if case == "count":
        np.save(tmp_path / "pos.npy", d["truth"].positions_px[:-1])
        positions = tmp_path / "pos.npy"
    elif case == "outside":
        extra = ["--origin", "0", "10"]
    elif case in ("threads", "max_minutes"):  # train's checks (train.check_training_options); --seed: test_cli
        extra = {"threads": ["--threads", "0"], "max_minutes": ["--max-minutes", "nan"]}[case]
    elif case == "real_object":
        np.save(tmp_path / "phase.npy", d["truth"].object_phase)
        obj = tmp_path / "phase.npy"
    elif case == "npz_without_object":
        obj = d["npz"]
    elif case == "flat_frames":
        np.save(tmp_path / "one.npy", d["frames"][0])
        frames = tmp_path / "one.npy"
    elif case == "complex_frames":
        np.save(tmp_path / "c.npy", d["frames"][:4].astype(np.complex64))
        frames = tmp_path / "c.npy"
    elif case == "nan_frames":
        bad = d["frames"].astype(np.float32)
        bad[7, 3, 3] = np.nan
        np.save(tmp_path / "nan.npy", bad)
        frames = tmp_path / "nan.npy"
    elif case == "no_positions":
        with h5py.File(tmp_path / "bare.h5", "w") as f:
            f["data"] = d["frames"][:4]
            f["uniqueId"] = np.arange(1, 5)
        frames, positions = tmp_path / "bare.h5", None
    elif case == "unknown_filter":  # compressed with a filter this h5py lacks (blosc without hdf5plugin)
        with h5py.File(tmp_path / "blosc.h5", "w") as f:
            data = f.create_dataset("data", (4, 128, 128), dtype="i2", chunks=(4, 128, 128), compression=32001,
                                    compression_opts=(2, 2, 2, 0, 5, 1, 1), allow_unknown_filter=True)
            data.id.write_direct_chunk((0, 0, 0), b"not blosc")
            f["uniqueId"] = np.arange(1, 5)
        frames, positions = tmp_path / "blosc.h5", None
    elif case == "data_group":  # another layout, with a group where the writer has its dataset
        with h5py.File(tmp_path / "group.h5", "w") as f:
            f.create_group("data")
            f["uniqueId"] = np.arange(1, 5)
        frames, positions = tmp_path / "group.h5", None
    elif case in ("short_positions", "flat_positions", "group_positions"):
        name = {"short_positions": "short", "flat_positions": "flat", "group_positions": "group_pos"}[case]
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["data"] = d["frames"][:4]
            f["uniqueId"] = np.arange(1, 5)
            if case == "group_positions":
                f.create_group("positions")
            else:
                f["positions"] = d["truth"].positions_px[:3] if case == "short_positions" else np.zeros(4)
        frames, positions = tmp_path / f"{name}.h5", None
    elif case in ("short_data", "uid_2d", "uid_float"):
        with h5py.File(tmp_path / f"{case}.h5", "w") as f:
            f["data"] = d["frames"][: 3 if case == "short_data" else 4]
            f["uniqueId"] = {"short_data": np.arange(1, 5), "uid_2d": np.arange(1, 5)[:, None],
                             "uid_float": np.arange(1.0, 5.0)}[case]
            f["positions"] = d["truth"].positions_px[:4]
        frames, positions = tmp_path / f"{case}.h5", None
    elif case == "model_outputs":  # phase images, as the chain's writer records them
        phase = np.random.default_rng(1).uniform(-np.pi, np.pi, (4, 128, 128)).astype(np.float32)
        with capsys.disabled():  # pvapy's logging takes the name of sys.stdout, which capsys's lacks
            frames = record_hdf5(tmp_path / "h5", phase, d["truth"].positions_px[:4],
                                 model_id="ptychonn sha256:1a2b3c4d5e6f")
        positions = None
    elif case == "old_model_outputs":  # the writer's layout before the modelId dataset
        with h5py.File(tmp_path / "old.h5", "w") as f:
            f["data"] = np.random.default_rng(1).uniform(-np.pi, np.pi, (4, 128, 128)).astype(np.float32)
            f["uniqueId"] = np.arange(1, 5)
            f["positions"] = d["truth"].positions_px[:4]
            f.attrs["inputChannel"], f.attrs["modelCard"] = "inference:1:output", '{"name": "ptychonn"}'
        frames, positions = tmp_path / "old.h5", None
    elif case == "zero_frames":
        np.save(tmp_path / "zeros.npy", np.zeros_like(d["frames"]))
        frames = tmp_path / "zeros.npy"
    elif case == "empty_text_positions":
        (tmp_path / "empty.txt").write_text("# y x\n")
        positions = tmp_path / "empty.txt"
    elif case == "frame_size":
        np.save(tmp_path / "small.npy", d["frames"][:, :64, :64])
        frames = tmp_path / "small.npy"
    elif case in ("empty_frames", "empty_object", "empty_probe"):
        (tmp_path / "empty.npy").write_bytes(b"")
        if case == "empty_frames":
            frames = tmp_path / "empty.npy"
        elif case == "empty_object":
            obj = tmp_path / "empty.npy"
        else:
            extra = ["--probe", tmp_path / "empty.npy"]
    elif case == "npz_frames":
        frames = shutil.copy(d["npz"], tmp_path / "scan.npz.npy")
    elif case == "empty_positions":
        (tmp_path / "empty.npz").write_bytes(b"")
        positions = tmp_path / "empty.npz"
    elif case == "npz_positions":
        positions = shutil.copy(d["npz"], tmp_path / "pos.npy")
    elif case == "npz_object":
        np.savez(tmp_path / "recon.npz", object=np.load(d["recon"]))
        obj = (tmp_path / "recon.npz").rename(tmp_path / "recon.npy")
    elif case in ("other_card", "card_scan_settings"):
        from dataclasses import replace

        from edge_ptychonn.model_card import save_card

        shutil.copy(default_model_path(), tmp_path / "base.onnx")
        card = load_card(default_model_path())
        if case == "other_card":
            card = replace(card, input_size=64, model=replace(card.model, input_size=64))
        else:
            card = replace(card, training=replace(card.training, scan_settings={**card.training.scan_settings,
                                                                                "frame_size": 128.0}))
        save_card(card, tmp_path / "base.onnx")
        extra = ["--init-from", tmp_path / "base.onnx"]
    out = tmp_path / "out" / "m"
    if case == "overwrite_base":  # a copy of the shipped model and its card: a broken guard overwrites only that
        base = tmp_path / "base" / default_model_path().name
        base.parent.mkdir()
        for suffix in (".onnx", ".json"):
            shutil.copy2(default_model_path().with_suffix(suffix), base.with_suffix(suffix))
        base_bytes = base.read_bytes()
        out, extra = base.with_suffix(""), ["--init-from", base]
    shipped_mtime = default_model_path().stat().st_mtime_ns
    # a short cap: a check that broke must not start a 10-minute training run
    argv = ["--frames", frames, "--object", obj, "--out", out, "--epochs", 1, "--max-minutes", 0.1, "--quiet", *extra]
    if positions is not None:
        argv += ["--positions", positions]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn finetune: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and default_model_path().stat().st_mtime_ns == shipped_mtime
    if case == "overwrite_base":
        assert base.read_bytes() == base_bytes and sorted(p.name for p in base.parent.iterdir()) == [
            base.with_suffix(".json").name, base.name]


def test_double_frames_beyond_float32_are_refused_as_nan_frames_are(tmp_path):
    """A double pixel beyond float32's range is infinite as the model's input (the processor counts such a frame
    ``nonfinite``). Before: taken, numpy's "overflow encountered in cast" warnings with a source line, "start:
    held-out loss nan", a whole epoch, then "the loss became nan in epoch 1: training diverged; lower --lr"
    (exit 1): a wrong remedy. Now refused when the frames are read, as NaN frames are."""
    frames = np.random.default_rng(0).uniform(0, 50, (3, 8, 8))
    frames[2, 4, 4] = 1e300
    np.save(tmp_path / "big.npy", frames)
    with pytest.raises(finetune.InputError, match=r"big\.npy: 1 frames hold NaN or infinite pixels \(or pixels "
                                                  r"beyond float32's range"):
        finetune.load_frames(tmp_path / "big.npy")
    frames[2, 4, 4] = -3e38  # within its range
    np.save(tmp_path / "ok.npy", frames)
    assert finetune.load_frames(tmp_path / "ok.npy").frames.shape == (3, 8, 8)


def test_help_names_the_convention(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--frames" in text and "top-left corner" in text and "--device" in text
    assert "finetune" in cli.usage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_clear_error(beamline, tmp_path, capsys):
    d = beamline
    rc = run_cli("--frames", d["npy"], "--positions", d["npz"], "--object", d["recon"], "--out", tmp_path / "m",
                 "--device", "cuda")
    assert rc == 2 and "device 'cuda' asked for, but torch" in capsys.readouterr().err
    assert training_device("auto") == "cpu" and training_device("cpu") == "cpu"


def test_a_model_with_head_blocks_unfolds_with_its_function(tmp_path):
    """Head blocks (a convolution with BatchNorm, then one without) survive export, reading
    back and unfolding: fine-tuning starts from the exported function."""
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx, from_onnx
    from edge_ptychonn.stream.preprocess import PreprocessConfig, preprocess

    model = build_model(ModelConfig(width=4, depth=2, input_size=32, head_blocks=2), seed=2)
    with torch.no_grad():
        for p in model.phase_blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    frames = np.random.default_rng(0).poisson(40, (16, 32, 32)).astype(np.int16)
    pp = PreprocessConfig(transform="sqrt", scale=0.1)
    x = torch.from_numpy(preprocess(frames, pp))[:, None]
    model.train()
    model(x)
    folded = from_onnx(export_onnx(model, tmp_path / "m.onnx"))
    unfolded = finetune.unfold_batchnorm(folded, frames, pp)
    assert unfolded.config.head_blocks == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules()) == 8 + 2
    with torch.no_grad():
        np.testing.assert_allclose(unfolded.eval()(x).numpy(), model.eval()(x).numpy(), atol=2e-4)


def test_a_base_that_crops_keeps_its_crop_and_output_mask_and_a_larger_probe_gets_its_own_mask(tmp_path, capsys):
    """A small base model whose card crops the detector frames and has an output mask: the
    fine-tuned card keeps both; with a probe whose bright centre reaches beyond that mask (the
    loss trains there), the new card's mask is a disc around that probe's bright centre, as
    ``train`` makes it."""
    from edge_ptychonn.model_card import ModelCard, save_card
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx
    from edge_ptychonn.science.simulate import ScanSettings, make_probe
    from edge_ptychonn.science.stitch import probe_weight
    from edge_ptychonn.science.train import output_mask_from_probe
    from edge_ptychonn.stream.postprocess import OutputMask
    from edge_ptychonn.stream.preprocess import PreprocessConfig

    settings = ScanSettings(seed=3, n_positions=64, frame_size=64, overlap=0.6, photons=1e5)
    frames, truth = simulate_scan(settings, progress=False)
    detector = np.pad(frames, ((0, 0), (4, 4), (4, 4)), constant_values=50)  # a bright border the crop cuts
    np.save(tmp_path / "frames.npy", detector)
    np.save(tmp_path / "positions.npy", (truth.positions_px + 32) * 2)  # the probe centre, in units of half a pixel
    np.save(tmp_path / "recon.npy", (truth.object_amplitude * np.exp(1j * truth.object_phase)).astype(np.complex64))
    base = export_onnx(build_model(ModelConfig(width=4, depth=2, input_size=64, head_blocks=1), seed=1).eval(),
                       tmp_path / "base.onnx")
    mask = OutputMask(centre_yx=(31.5, 31.5), radius_px=16.0)
    pp = PreprocessConfig(crop_hw=(64, 64), transform="sqrt", scale=0.05, normalize="running",
                          reference_total=float(frames.reshape(64, -1).sum(axis=1).mean()))
    save_card(ModelCard(name="base", input_size=64, preprocess=pp, output_mask=mask,
                        model=ModelConfig(width=4, depth=2, input_size=64, batch_norm=False, head_blocks=1)), base)
    default_probe = make_probe(64, settings.pupil_radius, settings.probe_diameter)
    assert not (probe_weight(default_probe) > 0)[mask.outside((64, 64))].any()  # the mask holds its bright centre
    common = ["--frames", tmp_path / "frames.npy", "--positions", tmp_path / "positions.npy", "--object",
              tmp_path / "recon.npy", "--init-from", base, "--epochs", 1, "--batch-size", 8, "--max-minutes", 0,
              "--device", "cpu", "--threads", 1, "--quiet", "--pixel-size", 2, "--position-ref", "centre"]
    assert run_cli(*common, "--out", tmp_path / "ft") == 0, capsys.readouterr().err
    card = load_card(tmp_path / "ft.onnx")
    assert card.preprocess == pp and card.output_mask == mask and card.training.steps >= 1
    # the card for people says how the positions were mapped, and names the head block (before: neither)
    md = (tmp_path / "ft.md").read_text()
    assert "positions.npy` (window corner in object pixels = position / 2 + (0, 0) - 32: positions of the probe " \
           "centre, rounded); reconstruction:" in md, md
    assert card.model.head_blocks == 1 and "1 residual head block(s) at full resolution" in md, md

    wide = make_probe(64, settings.pupil_radius, 40.0)  # a larger spot than the base's probe
    np.save(tmp_path / "probe.npy", wide)
    assert run_cli(*common, "--out", tmp_path / "wide", "--probe", tmp_path / "probe.npy") == 0, capsys.readouterr().err
    wide_mask = load_card(tmp_path / "wide.onnx").output_mask
    assert wide_mask == output_mask_from_probe(wide, 0.1) and wide_mask.radius_px > mask.radius_px
    assert finetune.output_mask_for(None, default_probe, 0.1) == output_mask_from_probe(default_probe, 0.1)


def test_the_detectors_crop_and_bin_are_options_that_go_into_the_new_card(tmp_path, capsys):
    """Recorded detector frames larger than the model's input (here 134x134 for a 64x64 model: the
    content at twice the resolution, binned 2, with a border the crop cuts): before, no option gave
    the crop and bin, and the refusal named none ("frames of (134, 134) become (134, 134) after the
    base model's preprocessing (crop None, bin 1)"). ``--crop``, ``--crop-origin`` and ``--bin``
    override the base card's, are checked as the processor checks them, and go into the new card;
    the positions (object pixels) stay as they are."""
    from dataclasses import replace

    from edge_ptychonn.stream.preprocess import preprocess

    frames, truth, base, pp = _small_scan_and_base(tmp_path)
    fine = np.kron(frames, np.ones((2, 2), frames.dtype))  # each pixel as a 2x2 block: bin 2 sums it back (x4)
    detector = np.pad(fine, ((0, 0), (1, 5), (3, 3)), constant_values=50)  # off centre: the crop needs its origin
    with capsys.disabled():  # PvaPy's logging wants the real stdout
        h5 = record_hdf5(tmp_path / "raw", detector, truth.positions_px)  # as the README's workflow records them
    common = ["--frames", h5, "--object", tmp_path / "recon.npy", "--init-from", base, "--epochs", 1,
              "--batch-size", 8, "--max-minutes", 0, "--device", "cpu", "--threads", 1, "--quiet"]

    for options, message in (
        ([], "frames of 134x134 become 134x134 with no crop and bin 1 (the base model's); the model takes 64x64: "
             "give the detector's crop and bin with --crop H W (centred, or at --crop-origin Y X) and --bin N, "
             "H = W = N x 64"),
        (["--crop", 128, 128], "frames of 134x134 become 128x128 with crop 128x128 and bin 1 (--crop, --crop-origin, "
                               "--bin); the model takes 64x64: give the detector's crop and bin with --crop H W"),
        (["--crop", 200, 128, "--bin", 2], "frames of 134x134 cannot take crop 200x128 and bin 2 (--crop, --crop-origin, "
                                           "--bin): crop 200x128 at (-33, 3) does not fit a 134x134 frame; the model "
                                           "takes 64x64: give"),
        (["--bin", 0], "--bin must be an integer 1..64, got 0"),  # PreprocessConfig's words, the processor's
        (["--crop", 0, 128], "--crop must be [height, width] of positive ints, got (0, 128)"),
        (["--crop-origin", 1, 3], "--crop-origin needs crop"),
    ):
        assert run_cli(*common, *options, "--out", tmp_path / "refused") == 2, options
        err = capsys.readouterr().err
        assert err.startswith(f"edge-ptychonn finetune: {message}") and err.count("\n") == 1, (options, err)
    assert not list(tmp_path.glob("refused*"))

    assert run_cli(*common, "--crop", 128, 128, "--crop-origin", 1, 3, "--bin", 2, "--out", tmp_path / "ft") == 0, \
        capsys.readouterr().err
    card = load_card(tmp_path / "ft.onnx")
    assert card.preprocess == replace(pp, crop_hw=(128, 128), crop_origin_yx=(1, 3), bin_factor=2)
    # what the consumers running the new model make of the detector's frames: the model's own inputs
    np.testing.assert_allclose(preprocess(detector, card.preprocess), preprocess(frames, pp), rtol=1e-5, atol=1e-5)
    assert finetune.load_base(tmp_path / "ft.pt")[3] == card.preprocess  # the checkpoint's, for a later --init-from
    md = " ".join((tmp_path / "ft.md").read_text().split())
    assert "kept from the base model but the detector's crop and bin, given to finetune (--crop, --crop-origin, " \
           "--bin), in `ft.json`" in md and "crop 128x128, bin 2" in md, md
    assert "--crop 128 128 --crop-origin 1 3 --bin 2" in card.training.command


def test_the_writers_raw_frames_are_taken_whatever_their_pixel_type_or_card(tmp_path):
    """Model outputs are told from raw frames by the writer's modelId dataset, not by the pixel
    type: float frames (some detectors give them) from a writer given a modelCard are raw frames."""
    frames = np.random.default_rng(2).uniform(0, 50, (4, 8, 8)).astype(np.float32)
    card = tmp_path / "card.json"
    card.write_text('{"name": "ptychonn"}')
    path = record_hdf5(tmp_path / "h5", frames, np.zeros((4, 2)), modelCard=str(card))
    with h5py.File(path, "r") as f:
        assert "modelCard" in f.attrs and f["modelId"].asstr()[:].tolist() == [""] * 4
    rec = finetune.load_frames(path)
    np.testing.assert_array_equal(rec.frames, frames)


def test_a_second_finetune_replaces_the_model_whole_and_a_stopped_one_leaves_it_as_it_was(
        beamline, small_base, tmp_path, capsys, monkeypatch):
    """The .pt was saved first, then the .md, the .json and the .onnx, each as it was made: a run stopped
    in between left a .pt that did not match the .onnx beside it. Now the four take their names
    together at the end, the .pt last (the last epoch's <out>.epoch.pt, which a run stopped before
    leaves beside the earlier model), and --help says that --out replaces a model of that name."""
    import os

    from edge_ptychonn.science import train as train_module

    np.save(tmp_path / "frames.npy", beamline["frames"][:160])
    np.save(tmp_path / "positions.npy", beamline["truth"].positions_px[:160])
    monkeypatch.setattr(train_module.Trainer, "train_one_epoch", lambda self, *a, **k: (0.5, False))  # no steps
    out = tmp_path / "models" / "site1"
    out.parent.mkdir()
    earlier = {suffix: f"the earlier model's {suffix}".encode() for suffix in (".onnx", ".json", ".md", ".pt")}
    for suffix, content in earlier.items():
        out.with_name(out.name + suffix).write_bytes(content)
    argv = ["--frames", tmp_path / "frames.npy", "--positions", tmp_path / "positions.npy", "--object",
            beamline["recon"], "--init-from", small_base, "--out", out, "--epochs", 1, "--max-minutes", 0,
            "--device", "cpu", "--quiet"]
    scores = finetune.held_out_scores

    def stopped_after_the_export(onnx, *args, **kwargs):  # the second call scores the new .onnx
        if scores_seen:
            raise KeyboardInterrupt
        scores_seen.append(onnx)
        return scores(onnx, *args, **kwargs)

    scores_seen = []
    monkeypatch.setattr(finetune, "held_out_scores", stopped_after_the_export)
    assert run_cli(*argv) == 130
    left = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert left.pop(out.name + ".epoch.pt")  # the stopped run's epoch
    assert left == {out.name + suffix: content for suffix, content in earlier.items()}  # as it was, nothing hidden

    monkeypatch.setattr(finetune, "held_out_scores", scores)
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), replace(src, dst)))
    assert run_cli(*argv) == 0, capsys.readouterr().err
    assert [name for name in renamed if not name.startswith(".")] == [out.name + s for s in (
        ".epoch.pt", ".md", ".json", ".onnx", ".pt")]  # the epoch's checkpoint, then the model: the .pt last
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(out.name + s for s in earlier)
    assert not any(out.with_name(out.name + s).read_bytes() == content for s, content in earlier.items())
    _, _, pt_card, _ = finetune.load_base(out.with_suffix(".pt"))
    assert pt_card == load_card(out.with_suffix(".onnx"))  # the checkpoint of this model, with its card

    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert "existing model of that name" in " ".join(capsys.readouterr().out.split())


def test_hdf5_frames_are_taken_in_uniqueid_order(tmp_path):
    # a writer on several consumers' channels receives their batches interleaved: positions by
    # frame index and the held-out block must follow the scan, not the arrival order
    from edge_ptychonn.science.finetune import load_frames, load_positions

    frames = np.arange(6 * 4 * 4, dtype=np.int16).reshape(6, 4, 4)
    arrival = np.array([3, 4, 1, 2, 6, 5])  # uniqueIds as the writer got them
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["data"] = frames[arrival - 1]
        f["uniqueId"] = arrival
        f["positions"] = np.stack([arrival * 10.0, arrival * 1.0], axis=1)
    rec = load_frames(tmp_path / "rec.h5")
    assert rec.unique_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert np.array_equal(rec.frames, frames)
    assert rec.positions[:, 0].tolist() == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    np.save(tmp_path / "pos.npy", np.stack([np.arange(6) * 2.0, np.arange(6) * 3.0], axis=1))
    pos = load_positions(tmp_path / "pos.npy", rec.unique_ids)  # scan position k for uniqueId k + 1
    assert np.array_equal(pos[2], [4.0, 6.0]) and np.array_equal(rec.frames[2], frames[2])


@pytest.mark.parametrize("compression", ["blosc", "lz4", "zstd", "bitshuffle"])
def test_hdf5_frames_written_with_a_plugin_compression_are_read(tmp_path, compression):
    # the writer's blosc, lz4, zstd and bitshuffle come from hdf5plugin (the hdf5 and test extras);
    # reading them needs its filters too
    pytest.importorskip("hdf5plugin")
    writer = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "compression": compression})
    frames = np.arange(5 * 16 * 16, dtype=np.int16).reshape(5, 16, 16)
    writer.start()
    for k, image in enumerate(frames):
        writer.process(good_frame(k + 1, image))
    writer.stop()
    [path] = writer.files
    with h5py.File(path, "r") as f:  # written with that filter (HDF5's registered ids)
        plist = f["data"].id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    assert {"blosc": 32001, "lz4": 32004, "zstd": 32015, "bitshuffle": 32008}[compression] in filters
    # read in a fresh process: this one has hdf5plugin's filters, which the writer loaded
    code = ("import sys; from edge_ptychonn.science.finetune import load_frames; "
            "r = load_frames(sys.argv[1]); print(r.unique_ids.tolist(), int(r.frames.sum()))")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[1,", "2,", "3,", "4,", "5]", str(int(frames.sum()))]


def test_a_diverged_finetune_writes_no_model(beamline, small_base, tmp_path, capsys):
    """A learning rate that sends the weights to NaN: one line and exit 1, and no model or card
    (before: a model that outputs NaN, its card and exit 0)."""
    out = tmp_path / "site"
    rc = run_cli("--frames", beamline["h5"], "--object", beamline["recon"], "--init-from", small_base, "--out", out,
                 "--epochs", 2, "--lr", "1e9", "--max-minutes", 0, "--device", "cpu", "--quiet")
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "edge-ptychonn finetune: the loss became nan in epoch" in err and "training diverged; lower --lr" in err
    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".json", ".md")]


def _recording_engines(monkeypatch):
    """Every engine the held-out scores open, recording the inputs it is given (a list per engine)."""
    seen = []
    opened = accuracy.open_engine

    def open_engine(*args, **kwargs):
        engine, inputs = opened(*args, **kwargs), []
        infer = engine.infer

        def recorded(x):
            inputs.append(np.array(x[:, 0]))
            return infer(x)

        engine.infer = recorded
        seen.append(inputs)
        return engine

    monkeypatch.setattr(accuracy, "open_engine", open_engine)
    return seen


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A small random model (width 4, depth 2) with the shipped card's preprocessing and training record."""
    from dataclasses import replace

    from edge_ptychonn.model_card import save_card
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = export_onnx(build_model(ModelConfig(width=4, depth=2), seed=0), tmp_path_factory.mktemp("base") / "b.onnx")
    save_card(replace(load_card(default_model_path()), name="b", model=ModelConfig(width=4, depth=2, batch_norm=False)),
              path)
    return path


def test_held_out_frames_are_normalised_as_live_and_a_diverged_run_names_no_checkpoint_it_did_not_write(
        beamline, small_base, tmp_path, capsys, monkeypatch):
    """normalize 'running': the held-out block ends the scan, so a consumer's running mean has counted the
    frames before it when the block arrives (and training scales every frame by the recording's mean, the
    value that running mean settles to). The held-out scores started a running mean of their own at the
    block: its first frame scaled by its own total, the next by the mean of two, ... other inputs than
    training and the live stream give (up to a third apart for an absorbing sample).
    And a diverged run names only a checkpoint it wrote: a loss that became NaN in epoch 2 was reported as
    '(<out>.pt holds epoch 1)', a file that did not exist (or an earlier run's); now epoch 1 is saved to
    <out>.epoch.pt, which the line names."""
    from edge_ptychonn.science import train as train_module
    from edge_ptychonn.stream.preprocess import preprocess

    frames, n = beamline["frames"][:160], 160  # 8 rows of the raster: 32 held out
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "positions.npy", beamline["truth"].positions_px[:n])
    seen = _recording_engines(monkeypatch)
    losses = iter([0.5, float("nan")])  # no steps: only what comes before and after them counts here
    monkeypatch.setattr(train_module.Trainer, "train_one_epoch", lambda self, *a, **k: (next(losses), False))
    out = tmp_path / "out" / "site"
    assert run_cli("--frames", tmp_path / "frames.npy", "--positions", tmp_path / "positions.npy", "--object",
                   beamline["recon"], "--init-from", small_base, "--out", out, "--epochs", 2, "--max-minutes", 0,
                   "--device", "cpu", "--quiet") == 1
    err = capsys.readouterr().err
    assert (f"edge-ptychonn finetune: the loss became nan in epoch 2: training diverged; lower --lr ({out}.epoch.pt "
            "holds epoch 1)\n") in err, err
    assert [p.name for p in out.parent.iterdir()] == ["site.epoch.pt"]
    pp = load_card(small_base).preprocess
    assert pp.normalize == "running"
    [inputs] = seen  # the base model's held-out scores
    np.testing.assert_allclose(np.concatenate(inputs), preprocess(frames, pp)[-32:], rtol=1e-5, atol=1e-6)


def _small_scan_and_base(tmp_path):
    """A 64-position scan of 64x64 frames, its truth as the "reconstruction" (``recon.npy``) and a
    width-4 64x64 base model ``b.onnx`` with a card (running normalisation, sqrt): returns the
    frames, the truth, the base model's path and its preprocessing."""
    from edge_ptychonn.model_card import ModelCard, save_card
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx
    from edge_ptychonn.science.simulate import ScanSettings
    from edge_ptychonn.stream.preprocess import PreprocessConfig

    frames, truth = simulate_scan(ScanSettings(seed=3, n_positions=64, frame_size=64, overlap=0.6, photons=1e5),
                                  progress=False)
    np.save(tmp_path / "recon.npy", (truth.object_amplitude * np.exp(1j * truth.object_phase)).astype(np.complex64))
    base = export_onnx(build_model(ModelConfig(width=4, depth=2, input_size=64), seed=1).eval(), tmp_path / "b.onnx")
    pp = PreprocessConfig(transform="sqrt", scale=0.05, normalize="running",
                          reference_total=float(frames.reshape(64, -1).sum(axis=1).mean()))
    save_card(ModelCard(name="b", input_size=64, preprocess=pp,
                        model=ModelConfig(width=4, depth=2, input_size=64, batch_norm=False)), base)
    return frames, truth, base, pp


def _cropped_detector_run(tmp_path):
    """A small run on detector frames that need a crop and bin: 132x132 frames (the 64x64 content at
    twice the resolution, binned 2, in a border the crop cuts) for a width-4 64x64 base model.
    Returns the options of a finetune run and the preprocessing the crop and bin make of the base's."""
    from dataclasses import replace

    frames, truth, base, pp = _small_scan_and_base(tmp_path)
    detector = np.pad(np.kron(frames, np.ones((2, 2), frames.dtype)), ((0, 0), (2, 2), (2, 2)), constant_values=50)
    np.save(tmp_path / "frames.npy", detector)
    np.save(tmp_path / "positions.npy", truth.positions_px)
    options = ["--frames", tmp_path / "frames.npy", "--positions", tmp_path / "positions.npy", "--object",
               tmp_path / "recon.npy", "--batch-size", 8, "--max-minutes", 0, "--device", "cpu", "--threads", 1,
               "--quiet"]
    return options, base, replace(pp, crop_hw=(128, 128), bin_factor=2)


def test_a_finetune_stopped_after_an_epoch_keeps_it_in_out_epoch_pt_and_init_from_continues(
        tmp_path, capsys, monkeypatch):
    """A tester's run: 4 epochs had brought the held-out loss from 0.831 to 0.261, and after Ctrl-C no
    file was left (the weights were saved at the end only). Now each finished epoch is saved to
    <out>.epoch.pt, as train saves it; a run stopped after one (here by SIGTERM, in epoch 2) keeps it,
    names it before its one line "interrupted" (exit 130), and finetune --init-from that file continues
    from those weights with their crop and bin; the run that finishes leaves no <out>.epoch.pt."""
    import os
    import signal

    from dataclasses import replace

    from edge_ptychonn.model_card import StitchSettings, Training, save_card
    from edge_ptychonn.science import train as train_module
    from edge_ptychonn.science.simulate import ScanSettings

    options, base, cropped = _cropped_detector_run(tmp_path)
    # a base card with its training scans and stitch settings, which the continued run's card keeps too
    # (it had the simulator's default probe and stitch settings and no scan settings: no card lies beside
    # an <out>.epoch.pt, so the checkpoint holds its base's)
    settings = ScanSettings(frame_size=64, probe_diameter_px=24, phase_range_rad=1.2).to_dict()
    base_card = replace(load_card(base), stitch=StitchSettings(probe_threshold=0.2),
                        training=Training(scan_settings=settings))
    save_card(base_card, base)
    epochs_run, one_epoch = [], train_module.Trainer.train_one_epoch

    def stopped_in_the_second_epoch(self, *args, **kwargs):
        epochs_run.append(self.step)
        if len(epochs_run) == 2:  # a batch system's stop (finetune's main turns it into Ctrl-C)
            os.kill(os.getpid(), signal.SIGTERM)
        return one_epoch(self, *args, **kwargs)

    monkeypatch.setattr(train_module.Trainer, "train_one_epoch", stopped_in_the_second_epoch)
    out = tmp_path / "out" / "ft"
    assert run_cli(*options, "--init-from", base, "--crop", 128, 128, "--bin", 2, "--epochs", 2, "--out", out) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"edge-ptychonn finetune: the last finished epoch's weights are in {out}.epoch.pt "
                        f"(--init-from {out}.epoch.pt continues from them)\nedge-ptychonn finetune: interrupted\n"), err
    assert [p.name for p in out.parent.iterdir()] == ["ft.epoch.pt"]  # nothing else, nothing hidden
    epoch = out.with_name("ft.epoch.pt")
    steps = epochs_run[1]  # the steps of epoch 1
    assert steps >= 1 and train_module.load_checkpoint(epoch)["step"] == steps
    assert finetune.load_base(epoch)[3] == cropped  # with the crop and bin, for --init-from
    train_module.check_init_from(epoch)  # a checkpoint train --init-from takes too
    held_out = float(err.split("epoch 1/2: ")[1].split("held-out loss ")[1].split()[0])

    monkeypatch.setattr(train_module.Trainer, "train_one_epoch", one_epoch)
    assert run_cli(*options, "--init-from", epoch, "--epochs", 1, "--out", out) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"start: held-out loss {held_out:.4f}\n" in err, err  # the stopped run's epoch-1 weights, as they were
    assert sorted(p.name for p in out.parent.iterdir()) == ["ft.json", "ft.md", "ft.onnx", "ft.pt"]  # no .epoch.pt
    card = load_card(out.with_name("ft.onnx"))
    assert card.preprocess == cropped and card.training.init_from == str(epoch)
    assert card.training.continued_from.checkpoint == str(epoch) and card.training.steps >= 1
    assert card.training.scan_settings == settings and card.stitch == base_card.stitch
    assert card.accuracy["finetune"]["data"]["probe"] == "the base model's training probe"


def test_a_finetune_stopped_before_its_first_epoch_leaves_no_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C before an epoch has finished: exit 130 with the one line "interrupted", no file of this
    run, and an <out>.epoch.pt that an earlier stopped run left is neither named nor touched."""
    import os

    from edge_ptychonn.science import train as train_module

    options, base, _ = _cropped_detector_run(tmp_path)

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "train_one_epoch", stopped)
    out = tmp_path / "out" / "ft"
    argv = [*options, "--init-from", base, "--crop", 128, 128, "--bin", 2, "--epochs", 2, "--out", out]
    assert run_cli(*argv) == 130
    err = capsys.readouterr().err
    assert err.endswith("edge-ptychonn finetune: interrupted\n") and "epoch.pt" not in err, err
    assert not list(out.parent.iterdir())

    earlier = out.with_name("ft.epoch.pt")
    earlier.write_bytes(b"an earlier stopped run's epoch")
    os.utime(earlier, (1e9, 1e9))
    assert run_cli(*argv) == 130
    err = capsys.readouterr().err
    assert err.endswith("edge-ptychonn finetune: interrupted\n") and "epoch.pt" not in err, err
    assert [p.name for p in out.parent.iterdir()] == ["ft.epoch.pt"]
    assert earlier.read_bytes() == b"an earlier stopped run's epoch"


def test_an_epoch_file_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys):
    """<out>.epoch.pt is one of the run's outputs: a folder of that name is refused at once (exit 2,
    one line), as an unwritable .onnx or .pt is, not after the first epoch."""
    out = tmp_path / "out" / "ft"
    out.with_name("ft.epoch.pt").mkdir(parents=True)
    assert run_cli("--frames", tmp_path / "none.npy", "--object", tmp_path / "none.npy", "--out", out) == 2
    err = capsys.readouterr().err
    assert err == f"edge-ptychonn finetune: cannot write --out {out}: {out}.epoch.pt is a folder\n", err
    assert [p.name for p in out.parent.iterdir()] == ["ft.epoch.pt"]


def test_a_wrapped_or_conjugated_reconstruction_is_warned_about(beamline, tmp_path, capsys):
    """The other sign convention (exp(-i phi)) or a global phase that wraps the phase at +-pi is a
    warning line on stderr, not silent training on the wrong targets."""
    obj = np.load(beamline["recon"])
    for name, recon, expected in (("wrap", obj * np.exp(2.5j), "wraps at +-pi"),):
        np.save(tmp_path / f"{name}.npy", recon.astype(np.complex64))
        assert run_cli("--frames", beamline["npy"], "--positions", beamline["npz"], "--object", tmp_path / f"{name}.npy",
                       "--out", tmp_path / name, "--epochs", 1, "--max-minutes", 0, "--quiet") == 0
        err = capsys.readouterr().err
        assert expected in err, err
    pairs, shift = finetune.phase_wraps(np.angle(obj).astype(np.float32), beamline["truth"].positions_px.astype(int),
                                        np.ones((128, 128), bool))
    assert pairs == 0
    assert finetune.sign_flipped({"patch_rmse_median_rad": 0.58, "conjugate_patch_rmse_median_rad": 0.088})
    assert not finetune.sign_flipped({"patch_rmse_median_rad": 0.088, "conjugate_patch_rmse_median_rad": 0.58})



def test_the_stitched_scores_do_not_depend_on_the_reconstructions_arbitrary_phase_zero(tmp_path):
    """A reconstruction's absolute phase is its code's choice: the same object shifted by 1.3 rad
    scores the same, stitched SSIM included (its brightness term reads absolute levels). Before:
    the held-out stitched SSIM of this random base model read 0.112 against the object as
    simulated and 0.152 against it shifted by 1.3 rad."""
    from edge_ptychonn.model_card import StitchSettings
    from edge_ptychonn.science.simulate import extract_patches
    from edge_ptychonn.science.stitch import probe_weight

    frames, truth, base, pp = _small_scan_and_base(tmp_path)
    corners = truth.positions_px
    weight = probe_weight(truth.probe, 0.1)
    scores = []
    for shift in (0.0, 1.3):
        phase = truth.object_phase + shift
        targets = extract_patches(phase, corners, truth.patch_shape)
        scores.append(finetune.held_out_scores(base, frames, pp, targets, corners, phase, weight, StitchSettings(),
                                               threads=1))
    assert "stitched_ssim" in scores[0]
    for key in ("stitched_ssim", "stitched_rmse_rad", "mean_abs_error_rad"):
        assert scores[1][key] == pytest.approx(scores[0][key], abs=1e-5), (key, scores)
