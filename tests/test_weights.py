"""Weights out of checkpoints and into models: what is loaded, what is refused, and how it is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config.schema import MaskedPatchObjective
from pretrain.evaluate import analyze, fewshot
from pretrain.model import ModelDescription, create_model
from pretrain.objectives.masked_patch import MaskedPatchModel
from pretrain.weights.formats import read_init_state, read_weights
from pretrain.weights.model_weights import Weights, WeightsError, model_file
from pretrain.weights.native import write_native
from pretrain.weights.safe_load import UntrustedCheckpointError, load_trusted
from pretrain.weights.surgery import load_matching
from pretrain.weights.trainer_checkpoint import read_checkpoint

SMALL = {"image_size": 16, "width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2}


def test_a_folder_that_is_not_a_checkpoint_gets_a_one_line_error(tmp_path: Path):
    with pytest.raises(WeightsError, match=r"not a checkpoint \(no latest file\)"):
        read_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("step-00000010")
    (tmp_path / "step-00000010").mkdir()
    with pytest.raises(WeightsError, match=r"step-00000010 has no trainer\.json; it is incomplete"):
        read_checkpoint(str(tmp_path))
    with pytest.raises(WeightsError, match="incomplete"):
        read_checkpoint(str(tmp_path / "step-00000010"))


def test_an_encoder_moves_between_a_masked_patch_model_and_a_classifier():
    torch.manual_seed(0)
    pretrained = MaskedPatchModel(
        create_model("Ti/4", num_classes=0, **SMALL), MaskedPatchObjective(type="masked_patch_prediction")
    )
    torch.nn.init.normal_(pretrained.head.weight)  # a trained patch head: 512 colours
    # 512 classes, the patch head's shape: the names agree too ("head.weight"), yet a colour head is no classifier
    classifier = create_model("Ti/4", num_classes=512, **SMALL)
    fresh = load_matching(classifier, pretrained.state_dict(), "mpp")
    assert fresh == ["head.weight", "head.bias"]
    assert not classifier.head.weight.any()  # the paper's zero-initialised fine-tuning head
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, pretrained.encoder.blocks[0].attn.qkv.weight)

    torch.nn.init.normal_(classifier.head.weight)
    back = MaskedPatchModel(
        create_model("Ti/4", num_classes=0, **SMALL), MaskedPatchObjective(type="masked_patch_prediction")
    )
    fresh = load_matching(back, classifier.state_dict(), "classifier")
    assert fresh == ["mask_token", "head.weight", "head.bias"]
    assert not back.head.weight.any()
    assert torch.equal(back.encoder.pos_embed, classifier.pos_embed)


def test_shapes_that_differ_keep_their_initialisation_and_nothing_matching_is_an_error():
    source = create_model("Ti/4", num_classes=5, **SMALL).state_dict()
    target = create_model("Ti/4", num_classes=10, **SMALL)
    assert load_matching(target, source, "five classes") == ["head.weight", "head.bias"]
    with pytest.raises(WeightsError, match="other: no tensor matches the model; is it a checkpoint of the same"):
        load_matching(target, {"something.else": torch.zeros(3)}, "other")
    deeper = create_model("Ti/4", num_classes=10, **{**SMALL, "mlp_dim": 96})
    with pytest.raises(WeightsError, match=r"wider: another variant than this run's model \(blocks\.0\.mlp\.fc1"):
        load_matching(deeper, source, "wider")


def test_a_position_table_of_another_grid_is_resized_as_the_model_resizes_it():
    torch.manual_seed(0)
    small = create_model("Ti/4", num_classes=3, **SMALL).eval()
    large = create_model("Ti/4", num_classes=3, **{**SMALL, "image_size": 24}).eval()
    assert load_matching(large, small.state_dict(), "16 px") == []
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():  # the 16 px model resizes its table on the fly for 24 px inputs
        assert torch.allclose(large(images), small(images), atol=1e-6)


def test_a_native_weights_folder_is_read_as_init_from_reads_it(tmp_path: Path):
    state = create_model("Ti/4", num_classes=3, **SMALL).state_dict()
    write_native(Weights(ModelDescription.of_variant("Ti/4", num_classes=3, **SMALL), state), tmp_path)
    loaded = read_init_state(str(tmp_path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_position_table_that_is_no_square_grid_for_the_model_is_reported_not_crashed_on():
    pooled = create_model("Ti/4", num_classes=3, pool="gap", **SMALL).state_dict()  # 16 positions, no class token
    pooled["cls_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(WeightsError, match=r"another variant than this run's model \(pos_embed is \(1, 16, 32\)"):
        load_matching(create_model("Ti/4", num_classes=3, **SMALL), pooled, "pooled")


def test_a_native_folder_from_before_model_json_is_still_read(tmp_path: Path):
    model = ModelDescription.of_variant("Ti/4", num_classes=3, **SMALL)
    write_native(Weights(model, model.build().state_dict()), tmp_path)
    legacy = json.loads((tmp_path / "model.json").read_text())["model"]  # what vit.json held: the bare architecture
    (tmp_path / "model.json").unlink()
    (tmp_path / "vit.json").write_text(json.dumps(legacy))
    assert read_weights(str(tmp_path)).model == model


def test_a_model_json_of_a_newer_format_or_damaged_is_refused_in_one_line(tmp_path: Path):
    model = ModelDescription.of_variant("Ti/4", num_classes=3, **SMALL)
    write_native(Weights(model, model.build().state_dict()), tmp_path)
    described = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**described, "format_version": 2}))
    with pytest.raises(WeightsError, match=r"model.json: format_version 2, this code reads up to 1; update"):
        read_weights(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps({**described, "model": {**described["model"], "depht": 2}}))
    with pytest.raises(WeightsError, match=r"model.json: .*unexpected keyword argument 'depht'.*damaged"):
        read_weights(str(tmp_path))


class Planted:
    """A pickle payload: unpickling it runs a command (here: creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trainer_checkpoint(root: Path, module_states: dict, described: ModelDescription | None = None) -> Path:
    """A checkpoint folder as the trainer writes one (one rank, ZeRO 0), holding `module_states` and a model.json
    describing `described` (default: the model of SMALL)."""
    described = described or ModelDescription.of_variant("Ti/4", num_classes=3, **SMALL)
    step = root / "step-00000010"
    step.mkdir(parents=True)
    (root / "latest").write_text(step.name)
    (step / "trainer.json").write_text(json.dumps({"format_version": 1, "step": 10}))
    (step / "model.json").write_text(json.dumps(model_file(described)))
    torch.save(module_states, step / "mp_rank_00_model_states.pt")
    return step


def plant_checkpoint(root: Path, marker: Path) -> Path:
    """A checkpoint folder whose module states file runs a command (creates `marker`) when unpickled."""
    state = create_model("Ti/4", num_classes=3, **SMALL).state_dict()
    return trainer_checkpoint(root, {"module": state, "payload": Planted(marker)})


def test_a_planted_checkpoint_is_refused_in_one_line_and_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"
    step = plant_checkpoint(tmp_path / "checkpoints", marker)
    with pytest.raises(UntrustedCheckpointError, match=rf"{step}/mp_rank_00_model_states.pt: refused to load"):
        read_checkpoint(str(tmp_path / "checkpoints"))
    with pytest.raises(UntrustedCheckpointError, match="refused to load"):
        load_trusted(str(step / "mp_rank_00_model_states.pt"))
    command = [
        sys.executable,
        "-m",
        "pretrain.weights.convert",
        str(tmp_path / "checkpoints"),
        "--to",
        "native",
        "--out",
        str(tmp_path / "out"),
    ]
    converted = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert converted.returncode == 2 and len(converted.stderr.strip().splitlines()) == 1, converted.stderr
    assert converted.stderr.startswith("error: ") and "refused to load" in converted.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_saved_as_model_safetensors_is_refused_in_one_line(tmp_path: Path):
    model = ModelDescription.of_variant("Ti/4", num_classes=3, **SMALL)
    write_native(Weights(model, model.build().state_dict()), tmp_path)
    torch.save(model.build().state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model.safetensors: not a safetensors file .*damaged"):
        read_weights(str(tmp_path))


def test_the_evaluation_commands_refuse_tampered_checkpoints_in_one_line(tmp_path: Path, capsys):
    """vit-analyze, the few-shot probe and model.init_from read checkpoints through the same guarded loaders as the
    converter: a planted pickle never runs, and tensors that contradict model.json are named, not dumped."""
    marker = tmp_path / "ran"
    planted = tmp_path / "planted"
    plant_checkpoint(planted, marker)
    shallow = create_model("Ti/4", num_classes=3, **SMALL).state_dict()
    deeper = ModelDescription.of_variant("Ti/4", num_classes=3, **{**SMALL, "depth": 2})
    mismatched = tmp_path / "mismatched"
    trainer_checkpoint(mismatched, {"module": shallow}, described=deeper)
    for checkpoint, expected in [(planted, "refused to load"), (mismatched, "blocks.1.norm1.weight is missing")]:
        for main, args in [
            (analyze.main, ["--images", "x", "--out", str(tmp_path / "y")]),
            (fewshot.main, ["--train", "x", "--test", "y"]),
        ]:
            assert main(["--checkpoint", str(checkpoint), *args]) == 2
            errors = capsys.readouterr().err.strip().splitlines()
            assert len(errors) == 1 and errors[0].startswith(f"error: {checkpoint}") and expected in errors[0], errors
    with pytest.raises(UntrustedCheckpointError, match="refused to load"):
        read_init_state(str(planted))
    assert not marker.exists() and not (tmp_path / "y").exists()
