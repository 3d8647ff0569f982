"""The output mask: a constant outside the illuminated region of each published patch."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from channel_names import PREFIX

from edge_ptychonn.model_card import ModelCard, default_model_path, load_card, save_card
from edge_ptychonn.stream.postprocess import OutputMask, apply_output_mask


def test_pixels_outside_the_disc_take_the_fill_value_in_place():
    mask = OutputMask(centre_yx=(7.5, 7.5), radius_px=4.0, fill_rad=0.25)
    batch = np.full((3, 1, 16, 16), 2.0, np.float32)
    out = apply_output_mask(batch, mask)
    assert out is batch  # in place
    y, x = np.mgrid[:16, :16]
    inside = np.hypot(y - 7.5, x - 7.5) <= 4.0
    assert np.all(batch[:, 0][:, inside] == 2.0) and np.all(batch[:, 0][:, ~inside] == 0.25)
    assert inside.sum() == 52 and np.array_equal(mask.outside((16, 16)), ~inside)
    # (N, H, W) stacks and single patches alike
    stack = np.ones((2, 16, 16), np.float32)
    single = np.ones((16, 16), np.float32)
    assert np.array_equal(mask.apply(stack)[1], mask.apply(single))


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_values_that_are_not_finite_outside_the_disc_are_replaced_and_inside_kept(fill):
    """With fill 0 the mask is a product with the disc, which turns an infinity or a NaN outside
    it into NaN: those batches get the masked copy too. Inside, a bad value stays bad (the
    pipeline counts that frame as a non-finite output)."""
    mask = OutputMask(centre_yx=(7.5, 7.5), radius_px=4.0, fill_rad=fill)
    batch = np.full((3, 1, 16, 16), -1.5, np.float32)
    batch[0, 0, 0, 0], batch[1, 0, 15, 3], batch[2, 0, 7, 7] = np.nan, -np.inf, np.inf
    out = apply_output_mask(batch, mask)
    outside = mask.outside((16, 16))
    assert np.all(out[:, 0][:, outside] == fill)
    assert np.all(out[:2, 0][:, ~outside] == -1.5)
    assert out[2, 0, 7, 7] == np.inf and np.isfinite(out[:2]).all()


def test_read_only_outputs_are_copied_and_none_leaves_outputs_alone():
    frozen = np.ones((1, 1, 8, 8), np.float32)
    frozen.setflags(write=False)
    out = OutputMask(centre_yx=(3.5, 3.5), radius_px=2.0).apply(frozen)
    assert out is not frozen and out[0, 0, 0, 0] == 0.0 and frozen[0, 0, 0, 0] == 1.0
    untouched = np.ones((2, 1, 8, 8), np.float32)
    assert apply_output_mask(untouched, None) is untouched and np.all(untouched == 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"radius_px": 0.0}, "radius_px must be > 0"),
        ({"radius_px": float("nan")}, "radius_px must be > 0"),
        ({"centre_yx": (1.0,)}, "centre_yx must be"),
        ({"fill_rad": float("inf")}, "fill_rad must be a number"),
    ],
)
def test_invalid_masks_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OutputMask(**kwargs)


def test_the_card_carries_the_mask_and_refuses_a_misspelt_key():
    card = ModelCard(name="m", output_mask=OutputMask(centre_yx=(31.5, 31.5), radius_px=10.0))
    d = card.to_dict()
    assert d["output_mask"] == {"centre_yx": [31.5, 31.5], "radius_px": 10.0, "fill_rad": 0.0}
    assert ModelCard.from_dict(json.loads(json.dumps(d))) == card
    with pytest.raises(ValueError, match="output_mask: unknown key"):
        ModelCard.from_dict({**d, "output_mask": {"radius": 3}})
    assert ModelCard.from_dict({"name": "old"}).output_mask is None  # older cards: no mask


def test_the_shipped_mask_holds_the_whole_bright_centre_so_stitching_is_unchanged():
    from edge_ptychonn.science.accuracy import score_scan
    from edge_ptychonn.science.simulate import ScanSettings, simulate_scan
    from edge_ptychonn.science.stitch import probe_weight

    card = load_card(default_model_path())
    assert card.output_mask is not None
    settings = replace(ScanSettings.from_dict(card.training.scan_settings), seed=7, n_positions=36)
    _, truth = simulate_scan(settings, progress=False)
    lit = probe_weight(truth.probe, card.stitch.probe_threshold) > 0
    outside = card.output_mask.outside(lit.shape)
    assert not np.any(lit & outside)  # every weighted pixel is inside the disc
    assert outside.mean() > 0.8  # and the disc is the probe's centre, not the patch
    # patches that are right inside and wild outside: masking changes no stitched score
    rng = np.random.default_rng(0)
    wild = truth.patches_phase + np.where(lit, 0.0, rng.uniform(-3, 3, truth.patches_phase.shape)).astype(np.float32)
    raw = score_scan("raw", wild.copy(), truth, card.stitch)
    masked = score_scan("masked", card.output_mask.apply(wild.copy()), truth, card.stitch)
    assert raw.scores == masked.scores
    np.testing.assert_array_equal(raw.image, masked.image)


@pytest.fixture
def carded_model(small_model, tmp_path):
    """The small 64x64 model with a card that has an output mask."""
    model = tmp_path / "masked.onnx"
    shutil.copy(small_model, model)
    save_card(ModelCard(name="masked", input_size=64, output_mask=OutputMask(centre_yx=(31.5, 31.5), radius_px=12.0)),
              model)
    return model


def test_output_mask_argument_defaults_to_the_cards_region(small_model, carded_model):
    from edge_ptychonn.stream.config import parse_processor_args

    config, _ = parse_processor_args({"modelPath": str(carded_model)})
    assert config.output_mask == OutputMask(centre_yx=(31.5, 31.5), radius_px=12.0)
    assert parse_processor_args({"modelPath": str(carded_model), "outputMask": False})[0].output_mask is None
    assert parse_processor_args({"modelPath": str(small_model)})[0].output_mask is None  # no card: no mask
    with pytest.raises(ValueError, match="outputMask is true but the model card"):
        parse_processor_args({"modelPath": str(small_model), "outputMask": True})
    with pytest.raises(ValueError, match="outputMask"):
        parse_processor_args({"modelPath": str(carded_model), "outputMask": "yes"})
    with pytest.raises(ValueError, match="outputMask"):  # not a run-time key
        from edge_ptychonn.stream.config import apply_runtime_changes
        apply_runtime_changes(config, {"outputMask": False})


def test_a_model_swap_keeps_the_users_output_mask_choice(small_model, carded_model):
    from edge_ptychonn.stream.config import apply_runtime_changes, parse_processor_args

    off, _ = parse_processor_args({"modelPath": str(small_model), "outputMask": False})
    assert apply_runtime_changes(off, {"modelPath": str(carded_model)})[0].output_mask is None  # stays off
    free, _ = parse_processor_args({"modelPath": str(small_model)})
    swapped = apply_runtime_changes(free, {"modelPath": str(carded_model)})[0]
    assert swapped.output_mask == OutputMask(centre_yx=(31.5, 31.5), radius_px=12.0)  # the new card's
    assert apply_runtime_changes(swapped, {"modelPath": str(small_model)})[0].output_mask is None  # no card: none
    on, _ = parse_processor_args({"modelPath": str(carded_model), "outputMask": True})
    with pytest.raises(ValueError, match="outputMask is true but the model card") as refused:
        apply_runtime_changes(on, {"modelPath": str(small_model)})
    # outputMask cannot change at run time: the advice is a restart, not "give outputMask false"
    assert "restart the consumer with outputMask false" in str(refused.value)
    assert "; give outputMask false" not in str(refused.value)


@pytest.mark.parametrize("masked", [True, False])
def test_the_pipeline_publishes_masked_patches(carded_model, rng, masked):
    from engines import EngineOptions, create_engine
    from edge_ptychonn.stream.preprocess import preprocess
    from test_pipeline import frames, make_pipeline
    from frames_util import good_frame

    pipeline, published, factory = make_pipeline(carded_model, batchTimeout=0.05, outputMask=masked)
    pipeline.start(factory)
    images = frames(rng, 10)
    for i, img in enumerate(images):
        pipeline.submit(good_frame(1 + i, img))
    assert published.wait(10) == 10
    pipeline.stop()
    reference = create_engine("onnxruntime", EngineOptions(carded_model, max_batch=10, cpu_threads=1))
    expected = reference.infer(preprocess(images, pipeline.config.preprocess)[:, None])[:, 0]
    outside = OutputMask(centre_yx=(31.5, 31.5), radius_px=12.0).outside((64, 64))
    got = np.stack([p[1] for p in published])
    np.testing.assert_allclose(got[:, ~outside], expected[:, ~outside], atol=1e-5)
    if masked:
        assert np.all(got[:, outside] == 0.0) and np.any(expected[:, outside] != 0.0)
    else:
        np.testing.assert_allclose(got[:, outside], expected[:, outside], atol=1e-5)
    assert pipeline.stats.published == 10 and pipeline.stats.unaccounted(pipeline.queued_frames) == 0


@pytest.mark.e2e
def test_a_live_consumer_normalises_the_dose_and_masks_its_outputs(pva_env, procs, tmp_path):
    """Real sim server -> real consumer with the shipped model (its card: normalize total,
    output mask): a low-dose scan comes out as the engine's result on the normalised frames,
    0 rad outside the illuminated disc; configure switches the normalisation at run time."""
    from edge_ptychonn.science.simulate import ScanSettings, simulate_scan
    from edge_ptychonn.stream.preprocess import preprocess
    from edge_ptychonn.tools.configure import send
    from edge_ptychonn.tools.processes import (
        OutputCollector, consumer_argv, read_status, sim_server_argv, start, wait_until,
    )
    from engines import EngineOptions, create_engine

    n, start_delay_s = 16, 7.0  # the shipped model loads in a few seconds on a busy machine
    frames, _ = simulate_scan(ScanSettings(seed=77, n_positions=n, photons=1e5), progress=False)
    np.save(tmp_path / "scan.npy", frames)
    image, prefix = f"{PREFIX}:mask:image", f"{PREFIX}:mask:inference"
    args = {"engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": 0.1}  # the shipped model
    consumer = start("consumer", consumer_argv(image, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args,
                                               report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumer)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=50, start_delay_s=start_delay_s),
                       pva_env, tmp_path))
    collector = OutputCollector([f"{prefix}:1:output"])
    try:
        assert collector.wait_connected(start_delay_s - 1), consumer.log()[-3000:]
        got = collector.wait_count(n, timeout_s=40, idle_s=10)
        control = f"{prefix}:1:control"
        assert send(control, '{"normalize": "none"}') == "Configuration successful"
        assert wait_until(lambda: json.loads((read_status(f"{prefix}:1:status") or {"userStats": {"settings": "{}"}})
                                             ["userStats"]["settings"]).get("normalize") == "none", 5)
        assert send(control, '{"normalize": "peak"}').startswith("Configuration failed")
        status = read_status(f"{prefix}:1:status")["userStats"]
    finally:
        collector.close()
    assert got == n, consumer.log()[-3000:]
    assert status["nFramesProcessed"] == n and status["nFramesUnaccounted"] == 0
    assert json.loads(status["settings"])["normalize"] == "none"

    card = load_card(default_model_path())
    engine = create_engine("onnxruntime", EngineOptions(default_model_path(), max_batch=n, cpu_threads=1))
    expected = engine.infer(preprocess(frames, card.preprocess)[:, None])[:, 0]
    outside = card.output_mask.outside(expected.shape[1:])
    received = sorted(collector.received[f"{prefix}:1:output"], key=lambda r: r.unique_id)
    assert [r.unique_id for r in received] == list(range(1, n + 1))
    for r in received:
        np.testing.assert_allclose(r.image[~outside], expected[r.unique_id - 1][~outside], atol=1e-4)
        assert np.all(r.image[outside] == card.output_mask.fill_rad)
