"""The model card: one typed schema, read and written in one place, clear errors."""

import json
from dataclasses import replace

import pytest

from edge_ptychonn.model_card import (
    CARD_VERSION,
    ModelCard,
    ModelConfig,
    StitchSettings,
    Training,
    card_path,
    check_input_size,
    default_model_path,
    find_card,
    load_card,
    save_card,
)
from edge_ptychonn.stream.preprocess import PreprocessConfig


def test_the_shipped_card_loads_and_round_trips():
    model = default_model_path()
    assert model.is_file() and model.name == "ptychonn.onnx"
    card = load_card(model)
    assert card.version == CARD_VERSION and card.name == "ptychonn" and card.input_size == 128
    assert card.preprocess == PreprocessConfig(transform="sqrt", scale=0.0184, normalize="running",
                                               reference_total=959800.0, normalize_window=1024)
    assert card.output_mask is not None and card.output_mask.fill_rad == 0.0
    assert card.stitch == StitchSettings(probe_threshold=0.1, min_cover_weight=0.5)
    assert card.model == ModelConfig(width=16, depth=4, input_size=128)
    assert card.training.eval_n_positions == 1024 and card.training.scan_settings["family"] == "mixed"
    # a run continued from earlier ones: the first (8 epochs) is fourteen stages back
    first = card.training
    for _ in range(15):
        first = first.continued_from
    assert first.epochs_run == 8 and first.continued_from is None
    assert set(card.accuracy["scans"]) >= {"mixed:1001", "siemens:1001"}
    assert set(card.accuracy["doses"]) == {"1e5", "1e7"} and card.accuracy["precision"]["scans"]
    assert ModelCard.from_dict(card.to_dict()) == card
    assert card.to_dict() == json.loads(card_path(model).read_text())  # the file is in the current form


def test_the_shipped_card_for_people_numbers_its_runs_from_the_first():
    """MODEL_CARD.md names each training run by its number from the first (docs cite "run 12",
    which stays true as runs are added), as card_markdown writes them from the JSON card."""
    from edge_ptychonn.science.train import card_markdown

    card = load_card(default_model_path())
    n_runs, run = 1, card.training
    while run.continued_from:
        n_runs, run = n_runs + 1, run.continued_from
    generated = card_markdown(card)
    shipped = (default_model_path().parent / "MODEL_CARD.md").read_text()
    assert f"- This is run {n_runs} of {n_runs};" in generated
    assert "- Run 1: `edge-ptychonn train --out data/generated/ship/ptychonn " in generated
    assert f"in {n_runs} runs." in generated
    runs = [line for line in generated.splitlines() if line.startswith(("- Run ", "- This is run "))]
    assert len(runs) == n_runs  # the heading line and one per earlier run
    for line in runs:  # the card for people carries the generated history as it is
        assert line in shipped, line[:80]


def test_save_and_load(tmp_path):
    card = ModelCard(name="m", input_size=64, preprocess=PreprocessConfig(crop_hw=(64, 64), bin_factor=2),
                     stitch=StitchSettings(0.2, 1.0), model=ModelConfig(width=4, depth=2, input_size=64),
                     training=Training(eval_n_positions=16, train_loss=(0.5, 0.25),
                                       continued_from=Training(checkpoint="a.pt")),
                     limits=("simulated only",), accuracy={"scans": {}})
    path = save_card(card, tmp_path / "m.onnx")
    assert path == tmp_path / "m.json"
    assert load_card(tmp_path / "m.onnx") == card
    d = json.loads(path.read_text())
    assert list(d)[0] == "version" and d["preprocess"]["crop_origin_yx"] is None  # settings written complete
    assert d["training"] == {"eval_n_positions": 16, "train_loss": [0.5, 0.25],
                             "continued_from": {"checkpoint": "a.pt"}}  # the record: None fields left out


def test_a_partial_card_takes_the_defaults():
    card = ModelCard.from_dict({"preprocess": {"transform": "sqrt"}})
    assert card.version == 1 and card.preprocess == PreprocessConfig(transform="sqrt")
    assert card.stitch == StitchSettings() and card.model is None and card.training is None
    assert ModelCard.from_dict({"stitch": None, "accuracy": None}) == ModelCard()  # null: the default


def test_no_card(tmp_path):
    assert find_card(tmp_path / "m.onnx") is None
    with pytest.raises(FileNotFoundError, match="m.json not found"):
        load_card(tmp_path / "m.onnx")


@pytest.mark.parametrize("card, message", [
    ({"preprocess": {"scael": 2.0}}, r"preprocess: unknown key\(s\) scael; known: crop_hw"),
    ({"stitch": {"probe_threshold": 1.5}}, r"stitch: stitch.probe_threshold must be in \[0, 1\), got 1.5"),
    ({"notes": "x"}, r"model card: unknown key\(s\) notes"),
    ({"training": {"continued_from": {"epoch": 1}}}, r"training.continued_from: unknown key\(s\) epoch"),
    ({"version": CARD_VERSION + 1}, "newer than this edge-ptychonn reads"),
    ({"version": "1"}, "version must be a positive integer"),
    ({"preprocess": {"transform": "cube"}}, "transform must be one of"),
    ({"model": {"width": 0}}, "model: width must be 1..256"),
    ({"input_size": -1}, "input_size must be a positive integer"),
    ({"input_size": 64, "model": {"input_size": 128}}, "input_size 64 and model.input_size 128 disagree"),
    ({"preprocess": [1, 2]}, "preprocess must be a JSON object"),
    ({"accuracy": [1]}, "accuracy must be a JSON object"),
    ({"training": {"scan_settings": "mixed"}}, "training.scan_settings must be a JSON object"),
    # values of the wrong type name their key (before: "'<=' not supported between instances of 'int' and
    # 'str'", or a width of 8.5 and an amplitude head "false" (true) accepted)
    ({"stitch": {"probe_threshold": "0.1"}}, r"stitch: stitch.probe_threshold must be a finite number, got '0.1'"),
    ({"stitch": {"min_cover_weight": True}}, r"stitch: stitch.min_cover_weight must be a finite number, got True"),
    ({"model": {"width": 8.5}}, r"model: width must be a whole number, got 8.5"),
    ({"model": {"amplitude_head": "false"}}, r"model: amplitude_head must be true or false, got 'false'"),
    # the training record, the outputs and the limits were not type-checked: "phase" read as the five
    # outputs p, h, a, s, e; a train_minutes of "x" in an --init-from card broke train at its end
    ({"outputs": "phase"}, r"model card: outputs must be a non-empty list of names, got 'phase'"),
    ({"limits": "text"}, r"model card: limits must be a list of sentences, got 'text'"),
    ({"limits": ["a", 1]}, r"model card: limits must be a list of sentences, got \('a', 1\)"),
    ({"training": {"train_minutes": "x"}}, r"training: train_minutes must be a number, got 'x'"),
    ({"training": {"epochs_run": 2.5}}, r"training: epochs_run must be a whole number, got 2.5"),
    ({"training": {"bf16": "no"}}, r"training: bf16 must be true or false, got 'no'"),
    ({"training": {"command": 3}}, r"training: command must be a string, got 3"),
    ({"training": {"train_seeds": [1, True]}}, r"training: train_seeds must be a list of whole numbers"),
    ({"training": {"continued_from": {"train_loss": [0.5, "a"]}}},
     r"training.continued_from: train_loss must be a list of numbers, got \(0.5, 'a'\)"),
    ({"training": {"dose_range": [0.1]}}, r"training: dose_range must be two numbers \(low, high\), got \(0.1,\)"),
    ({"training": {"family_mix": {"siemens": "half"}}}, r"training: family_mix must be a JSON object of family: "),
    # values that read, but then give nothing: before, a min_cover_weight of Infinity scored no pixel (evaluate
    # failed at its end, the demo's stitcher reported no coverage), an eval_n_positions of 0 meant 1024
    ({"stitch": {"min_cover_weight": float("inf")}}, r"stitch: stitch.min_cover_weight must be a finite number"),
    ({"training": {"eval_n_positions": 0}}, r"training: eval_n_positions must be at least 1, got 0"),
    # outputs that are not what the model block's network gives: before, read without a word, and the
    # card for people listed outputs the model does not have
    ({"model": {"amplitude_head": True}}, r"outputs \['phase'\] and model.amplitude_head true disagree: that "
                                          r"network's outputs are \['phase', 'amplitude'\]"),
    ({"outputs": ["phase", "amplitude"], "model": {}}, r"outputs \['phase', 'amplitude'\] and model.amplitude_head "
                                                       r"false disagree"),
])
def test_malformed_cards_are_refused_with_the_reason(tmp_path, card, message):
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=message) as err:
        load_card(tmp_path / "m.onnx")
    assert f"cannot read model card {tmp_path / 'm.json'}" in str(err.value)


def test_unparsable_json_is_a_value_error(tmp_path):
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read model card"):
        find_card(tmp_path / "m.onnx")


def test_accuracy_and_scan_settings_are_kept_as_written():
    card = ModelCard.from_dict({"accuracy": {"anything": [1, {"x": None}]},
                                "training": {"scan_settings": {"seed": None, "family": "mixed"}}})
    assert card.accuracy == {"anything": [1, {"x": None}]}
    assert card.training.scan_settings == {"seed": None, "family": "mixed"}
    assert replace(card, name="n").to_dict()["accuracy"] == {"anything": [1, {"x": None}]}


def test_the_shipped_markdown_card_is_rendered_from_the_json_card():
    from edge_ptychonn.science.train import card_markdown

    model = default_model_path()
    rendered = card_markdown(load_card(model)).split("## Limits")[0].rstrip()
    assert (model.parent / "MODEL_CARD.md").read_text().startswith(rendered)


def test_export_refuses_to_put_random_weights_beside_another_models_card(tmp_path, capsys):
    """Before: ``export --out data/ptychonn.onnx`` replaced the model and kept its card, so the processor
    and ``evaluate`` ran random weights with the trained model's preprocessing and claims, without a word."""
    from edge_ptychonn import cli

    out = tmp_path / "m.onnx"
    save_card(ModelCard(name="trained", input_size=8), out)
    argv = ["export", "--out", str(out), "--width", "2", "--depth", "1", "--input-size", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge-ptychonn export: {tmp_path / 'm.json'} lies beside {out}") and err.count("\n") == 1
    assert not out.exists() and load_card(out).name == "trained"
    card_path(out).unlink()
    assert cli.main(argv) == 0 and out.exists()


def test_a_card_for_another_input_size_is_refused_by_one_check_that_also_reads_the_model_block(tmp_path):
    """``check_input_size``: the one check of the processor, evaluate, train --init-from and finetune. A card
    that gives its size only in ``model.input_size`` counts too (the processor's own check read only
    ``input_size``, evaluate's both, with two messages)."""
    model = tmp_path / "m.onnx"
    message = (f"the model card {tmp_path / 'm.json'} says input_size 128, but the model takes 64x64 input: it is "
               "another model's card (its preprocessing and output mask would be applied to this one)")
    for card in (ModelCard(input_size=128), ModelCard(model=ModelConfig(input_size=128))):
        with pytest.raises(ValueError) as err:
            check_input_size(card, model, (64, 64))
        assert str(err.value) == message
        check_input_size(card, model, (128, 128))
    with pytest.raises(ValueError, match="takes 128x64 input"):
        check_input_size(ModelCard(input_size=128), model, (128, 64))
    for card in (None, ModelCard()):  # no card, or one that gives no size: nothing to check
        check_input_size(card, model, (64, 64))


def test_every_field_of_the_training_record_is_type_checked():
    """A field added to ``Training`` without a type in the check would be read unchecked again."""
    from dataclasses import fields

    from edge_ptychonn.model_card import _TRAINING_TYPES

    assert set(_TRAINING_TYPES) == {f.name for f in fields(Training)} - {"continued_from"}


def test_an_output_mask_that_holds_no_pixel_of_the_output_is_refused():
    """A centre in detector pixels (255.5 for a 512 detector binned to 128) or past the edge: every
    published phase pixel was set to fill_rad, without a word. A disc that reaches into the patch
    is a card's own business."""
    import numpy as np

    from edge_ptychonn.stream.postprocess import OutputMask

    far = {"centre_yx": [255.5, 255.5], "radius_px": 22.0}
    assert not OutputMask(**far).apply(np.ones((1, 128, 128), np.float32)).any()  # what it did
    for card in ({"input_size": 128, "output_mask": far},
                 {"model": {"input_size": 64}, "output_mask": {"centre_yx": [63.5, 90.0], "radius_px": 22.0}}):
        with pytest.raises(ValueError, match=r"output_mask: the disc of radius 22 around \[.*\] holds no pixel of "
                                             r"the (128x128|64x64) output .*every phase pixel would be set to fill_rad"):
            ModelCard.from_dict(card)
    for centre, size in (([63.5, 63.5], 64), ([-21.0, 63.0], 128), ([63.5, 63.5], None)):
        card = ModelCard.from_dict({"input_size": size, "output_mask": {"centre_yx": centre, "radius_px": 22.0}})
        if size is not None:
            assert card.output_mask.inside_f32((size, size)).any()
