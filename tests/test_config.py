import json

import pytest

from edge_ptychonn.stream.config import (
    SEED_ALIASES,
    apply_runtime_changes,
    model_identity,
    parse_processor_args,
    runtime_settings,
    start_geometry_warning,
)

FRAMEWORK = {
    "processorId": 2, "inputChannel": "ad:image", "outputChannel": "inference:2:output",
    "inputMode": "pva", "outputMode": "pvas", "objectIdField": "uniqueId", "objectIdOffset": 9,
    "skipInitialUpdates": 1, "nSequentialUpdates": 8, "fieldRequest": "",
}


def test_user_and_framework_keys_are_separated(small_model):
    config, framework = parse_processor_args(
        {**FRAMEWORK, "modelPath": str(small_model), "batchSize": 4, "batchTimeout": 0.2, "bin": 2}
    )
    assert config.batch_size == 4 and config.batch_timeout_s == 0.2
    assert config.preprocess.bin_factor == 2
    assert framework["processorId"] == 2 and framework["nSequentialUpdates"] == 8


def test_defaults(small_model):
    config, _ = parse_processor_args({"modelPath": str(small_model)})
    assert (config.engine, config.batch_size, config.batch_timeout_s) == ("auto", 8, 0.05)
    assert config.io_threads == "batch"


def test_unknown_key_is_named_with_the_accepted_ones(small_model):
    with pytest.raises(ValueError, match=r"unknown processor argument\(s\) batchsize; accepted: modelPath"):
        parse_processor_args({"modelPath": str(small_model), "batchsize": 8})


@pytest.mark.parametrize(
    "args, message",
    [
        ({"batchSize": 0}, "batchSize must be an integer 1..256, got 0"),
        ({"batchSize": "8"}, "batchSize must be an integer"),
        ({"batchTimeout": 0}, "batchTimeout must be 0.001..60 s"),
        ({"device": "gpu"}, "device must be"),
        ({"precision": "int8"}, "precision must be one of"),
        ({"crop": [512]}, "crop must be a list of two integers"),
        ({"ioThreads": "fifo"}, "ioThreads must be one of 'batch', 'unchanged', got 'fifo'"),
    ],
)
def test_invalid_values(small_model, args, message):
    with pytest.raises(ValueError, match=message):
        parse_processor_args({"modelPath": str(small_model), **args})


def test_missing_model_file(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        parse_processor_args({"modelPath": str(tmp_path / "nope.onnx")})


def test_seed_aliases(small_model):
    config, _ = parse_processor_args({"bsz": 16, "onnx_mdl": str(small_model)}, aliases=SEED_ALIASES)
    assert config.batch_size == 16 and config.model_path == small_model
    with pytest.raises(ValueError, match="either 'bsz' or 'batchSize'"):
        parse_processor_args({"bsz": 16, "batchSize": 8, "modelPath": str(small_model)}, aliases=SEED_ALIASES)
    # a bad value given by its alias is named as given (the message named batchSize, a key the user never wrote)
    with pytest.raises(ValueError, match=r"^bsz \(batchSize\) must be an integer 1\.\.256, got 0$"):
        parse_processor_args({"bsz": 0, "modelPath": str(small_model)}, aliases=SEED_ALIASES)
    with pytest.raises(ValueError, match=r"^onnx_mdl \(modelPath\) "):
        parse_processor_args({"onnx_mdl": str(small_model.with_name("none.onnx"))}, aliases=SEED_ALIASES)


def test_model_sidecar_gives_default_preprocessing(tmp_path, small_model):
    model = tmp_path / "m.onnx"
    model.write_bytes(small_model.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": {"transform": "sqrt", "scale": 0.5}}))
    config, _ = parse_processor_args({"modelPath": str(model)})
    assert (config.preprocess.transform, config.preprocess.scale) == ("sqrt", 0.5)
    config, _ = parse_processor_args({"modelPath": str(model), "scale": 2.0})
    assert (config.preprocess.transform, config.preprocess.scale) == ("sqrt", 2.0)


def test_runtime_changes_are_validated_all_or_nothing(small_model):
    config, _ = parse_processor_args({"modelPath": str(small_model)})
    new, applied = apply_runtime_changes(config, {"batchTimeout": 0.5, "scale": 3.0, "objectIdOffset": 17})
    assert applied == {"batchTimeout": 0.5, "scale": 3.0}
    assert new.batch_timeout_s == 0.5 and new.preprocess.scale == 3.0
    with pytest.raises(ValueError, match="cannot change batchSize at run time; changeable: batchTimeout"):
        apply_runtime_changes(config, {"batchSize": 4, "batchTimeout": 0.5})
    with pytest.raises(ValueError, match="batchTimeout must be"):
        apply_runtime_changes(config, {"batchTimeout": -1})
    # an unbounded number's message has no stray space before the comma
    with pytest.raises(ValueError) as refused:
        apply_runtime_changes(config, {"batchTimeout": "abc"})
    assert str(refused.value) == "batchTimeout must be a finite number, got 'abc'"
    assert config.batch_timeout_s == 0.05  # frozen: the original never changes


def test_a_new_model_brings_its_cards_preprocessing_and_keeps_the_geometry(tmp_path, small_model):
    old = tmp_path / "old.onnx"
    old.write_bytes(small_model.read_bytes())
    (tmp_path / "old.json").write_text(json.dumps({"preprocess": {"transform": "log1p", "scale": 3.0, "offset": 1.0}}))
    new = tmp_path / "new.onnx"
    new.write_bytes(small_model.read_bytes())
    (tmp_path / "new.json").write_text(json.dumps({"name": "b", "preprocess": {"transform": "sqrt", "scale": 0.5}}))
    config, _ = parse_processor_args({"modelPath": str(old), "crop": [60, 60], "bin": 1})
    swapped, applied = apply_runtime_changes(config, {"modelPath": str(new)})
    assert applied == {"modelPath": str(new)} and swapped.model_path == new
    p = swapped.preprocess
    assert (p.transform, p.scale, p.offset, p.crop_hw, p.bin_factor) == ("sqrt", 0.5, 0.0, (60, 60), 1)
    swapped, _ = apply_runtime_changes(config, {"modelPath": str(new), "offset": 2.0})
    assert (swapped.preprocess.scale, swapped.preprocess.offset) == (0.5, 2.0)  # the request wins
    swapped, _ = apply_runtime_changes(config, {"modelPath": str(small_model)})  # no card: the defaults
    assert (swapped.preprocess.transform, swapped.preprocess.scale, swapped.preprocess.offset) == ("none", 1.0, 0.0)
    assert runtime_settings(swapped)["modelPath"] == str(small_model)
    json.dumps(runtime_settings(swapped))  # the status channel's settings string
    with pytest.raises(ValueError, match="modelPath 'nowhere.onnx' is not a file"):
        apply_runtime_changes(config, {"modelPath": "nowhere.onnx", "scale": 2.0})
    (tmp_path / "new.json").write_text(json.dumps({"preprocess": {"scael": 2}}))
    with pytest.raises(ValueError, match="cannot read model card.*scael"):
        apply_runtime_changes(config, {"modelPath": str(new)})
    with pytest.raises(ValueError, match="modelPath must be a path"):
        apply_runtime_changes(config, {"modelPath": 3})


def test_a_new_models_card_must_bin_as_the_running_consumer_does(tmp_path, small_model):
    """A swap keeps the detector's crop and bin: a card made for another bin is refused (the model
    would see another magnification); the same bin fits, whether the card names the window as a
    crop or as whole frames (same input size, so the same window); a card stating no detector fits."""
    config, _ = parse_processor_args({"modelPath": str(small_model), "crop": [128, 128], "bin": 2})
    cards = {"whole-frames-bin-2": {"bin_factor": 2}, "crop-bin-2": {"crop_hw": [128, 128], "bin_factor": 2},
             "none": {}, "crop-256-bin-4": {"crop_hw": [256, 256], "bin_factor": 4}, "bin-1": {"crop_hw": [64, 64]}}
    for name, preprocess in cards.items():
        model = tmp_path / f"{name}.onnx"
        model.write_bytes(small_model.read_bytes())
        (tmp_path / f"{name}.json").write_text(json.dumps({"preprocess": preprocess}))
    for name in ("whole-frames-bin-2", "crop-bin-2", "none"):
        swapped, _ = apply_runtime_changes(config, {"modelPath": str(tmp_path / f"{name}.onnx")})
        assert (swapped.preprocess.crop_hw, swapped.preprocess.bin_factor) == ((128, 128), 2), name
    for name, theirs in (("crop-256-bin-4", "crop 256x256 and bin 4"), ("bin-1", "crop 64x64 and bin 1")):
        with pytest.raises(ValueError, match=f"made for frames with {theirs}, but this consumer runs crop 128x128 and "
                                             "bin 2 .*restart the consumer with this model"):
            apply_runtime_changes(config, {"modelPath": str(tmp_path / f"{name}.onnx")})


def test_a_start_with_a_crop_and_bin_that_bin_otherwise_than_the_card_is_warned_of(tmp_path, small_model):
    """A consumer started with crop and bin arguments that bin otherwise than its model's card was
    made for ran without a word (a swap to such a card is refused); now the start warns. Arguments
    that agree with the card, no arguments (the card's own), and a card stating no detector: none."""
    model = tmp_path / "m.onnx"
    model.write_bytes(small_model.read_bytes())
    card = tmp_path / "m.json"
    card.write_text(json.dumps({"preprocess": {"crop_hw": [256, 256], "bin_factor": 4}}))
    warned = lambda **args: start_geometry_warning(parse_processor_args({"modelPath": str(model), **args})[0])  # noqa: E731
    message = warned(crop=[128, 128], bin=2)
    assert message and "made for frames with crop 256x256 and bin 4, but this consumer was started with crop " \
        "128x128 and bin 2" in message and "another magnification" in message, message
    assert "bin 1" in warned(bin=1, crop=None)
    assert warned() is None and warned(crop=[512, 512]) is None  # the card's bin: the same detector window
    card.write_text(json.dumps({"preprocess": {}}))  # a model trained on frames of its input size
    assert warned(crop=[128, 128], bin=2) is None


def test_model_identity_names_the_card_and_the_content(tmp_path, small_model):
    import hashlib

    digest = hashlib.sha256(small_model.read_bytes()).hexdigest()[:12]
    assert model_identity(small_model) == f"small sha256:{digest}"  # no card: the file's stem
    carded = tmp_path / "m.onnx"
    carded.write_bytes(small_model.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"name": "ptychonn-b"}))
    assert model_identity(carded) == f"ptychonn-b sha256:{digest}"
    carded.write_bytes(small_model.read_bytes() + b"\0")
    assert model_identity(carded) != f"ptychonn-b sha256:{digest}"
    with pytest.raises(ValueError, match="cannot read modelPath"):
        model_identity(tmp_path / "nowhere.onnx")


def test_nan_and_infinity_are_refused_where_a_number_is_due(tmp_path):
    """NaN passes every range check: an HDF5 writer with flushPeriod NaN never flushed on time,
    queueTimeout NaN waited for ever. The stitcher's fill takes NaN ("no data") on purpose."""
    import math

    from edge_ptychonn.stream.arguments import number
    from processors.hdf5_writer import Hdf5WriterProcessor
    from processors.stitch import StitchProcessor

    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="must be a finite number"):
            number()(value)
    assert number(finite=False)(math.inf) == math.inf
    for key in ("flushPeriod", "queueTimeout"):
        with pytest.raises(ValueError, match=f"{key}.*must be a finite number 0"):
            Hdf5WriterProcessor({"outputDirectory": str(tmp_path / "h5"), key: math.nan})
    stitcher = StitchProcessor({"outputDirectory": str(tmp_path / "st"), "objectShape": [64, 64], "fill": math.nan})
    assert math.isnan(stitcher.settings.fill)


def test_an_integer_beyond_floats_range_is_refused_where_a_number_is_due(small_model):
    """JSON allows an integer of any length: 10**400 made float() raise OverflowError, a
    traceback at start and an unexplained "Configuration failed" at run time."""
    from edge_ptychonn.stream.arguments import number

    huge = 10**400
    for convert in (number(), number(0, 1), number(finite=False)):
        with pytest.raises(ValueError, match="must be a .*number"):
            convert(huge)
    assert number(0)(10**300) == 1e300
    for key in ("scale", "offset", "referenceTotal", "batchTimeout"):
        with pytest.raises(ValueError, match=f"{key} must be"):
            parse_processor_args({"modelPath": str(small_model), key: -huge})


def test_a_path_with_a_nul_character_is_refused_naming_its_key(tmp_path):
    """Every path argument (modelPath, planCacheDir, the writers' outputDirectory ...) refuses a
    NUL at start, naming the key; the first use raised a bare "embedded null byte"."""
    from processors.hdf5_writer import Hdf5WriterProcessor
    from processors.stitch import StitchProcessor

    with pytest.raises(ValueError, match="planCacheDir must be a path without a NUL"):
        parse_processor_args({"modelPath": "m.onnx", "planCacheDir": "plans\0x"})
    with pytest.raises(ValueError, match="outputDirectory must be a path without a NUL"):
        Hdf5WriterProcessor({"outputDirectory": str(tmp_path / "a\0b")})
    with pytest.raises(ValueError, match="outputDirectory must be a path without a NUL"):
        StitchProcessor({"outputDirectory": str(tmp_path / "a\0b"), "objectShape": [64, 64]})
