"""Exported weights behave as ours: transformers' ViT and timm's give our logits, and the pipeline our top-1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pretrain.config.load import validate
from pretrain.demos.digits import write_digits
from pretrain.model import model_input
from pretrain.objectives import build_model
from pretrain.weights.convert import main
from pretrain.weights.hf import from_hf, write_hf
from pretrain.weights.model_weights import Weights, WeightsError, weights_of_run
from pretrain.weights.native import read_native, write_native
from pretrain.weights.surgery import check_weights, choose_head
from pretrain.weights.timm import write_timm

BASE = {
    "run": {"name": "t"},
    "model": {
        "variant": "Ti/4",
        "image_size": 32,
        "width": 64,
        "depth": 2,
        "mlp_dim": 128,
        "num_heads": 4,
        "num_classes": 10,
    },
    "data": {"train": "x/index.json", "batch_size": 8},
    "optimizer": {"lr": 1e-3},
    "schedule": {"steps": 10, "warmup_steps": 1},
}


def trained(**model: object) -> tuple[Weights, torch.nn.Module]:
    """A model with every weight random (the zero-initialised head and tokens too), as a checkpoint gives it."""
    config = validate({**BASE, "model": {**BASE["model"], **model}})
    torch.manual_seed(0)
    net = build_model(config).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return weights_of_run(config, net.state_dict()), net


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_transformers_model_gives_our_logits(tmp_path: Path):
    from transformers import ViTForImageClassification, ViTModel

    weights, ours = trained()
    write_hf(weights, tmp_path)
    theirs = ViTForImageClassification.from_pretrained(tmp_path).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(theirs(pixel_values=images).logits, ours(images)) <= 1e-5
        encoder = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
        tokens = encoder(pixel_values=images).last_hidden_state
        assert relative_error(tokens, ours.forward_features(images)) <= 1e-5


def test_image_classification_pipeline_agrees_with_our_top1(tmp_path: Path):
    from transformers import pipeline

    weights, ours = trained()
    write_digits(tmp_path / "digits", size=32)  # real scans at the model's size: the processor's resize is exact
    images = [Image.open(path).convert("RGB") for path in sorted((tmp_path / "digits").glob("*/*.png"))[::150]]
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])
    with torch.no_grad():  # prototype rows, so that the random model's top class differs between images
        features = ours(model_input(pixels), pre_logits=True)
        ours.head.weight.copy_(10 * (features - features.mean(0))[:10])
        ours.head.bias.zero_()
        tops = ours(model_input(pixels)).argmax(-1).tolist()
    write_hf(Weights(weights.model, ours.state_dict()), tmp_path / "hf")
    classify = pipeline("image-classification", model=str(tmp_path / "hf"), device="cpu")
    for image, top in zip(images, tops, strict=True):
        assert classify(image, top_k=1)[0]["label"] == f"LABEL_{top}"
    assert len(images) >= 10 and len(set(tops)) > 5


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_timm_loads_the_export_strictly_and_gives_our_logits(pool: str, tmp_path: Path):
    weights, ours = trained(pool=pool)
    write_timm(weights, tmp_path)
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # strict load of model.safetensors
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(theirs(images), ours(images)) <= 1e-5


def test_masked_patch_encoder_gets_a_new_zero_head_and_unsupported_models_are_refused(tmp_path: Path):
    mpp = validate(
        {**BASE, "model": {**BASE["model"], "num_classes": 0}, "objective": {"type": "masked_patch_prediction"}}
    )
    torch.manual_seed(0)
    encoder_weights = weights_of_run(mpp, build_model(mpp).state_dict())
    assert not any(name.startswith(("encoder.", "mask_token")) for name in encoder_weights.state)
    with pytest.raises(WeightsError, match=r"no classifier to keep.*add --num-classes K"):
        choose_head(encoder_weights, keep_head=True)
    tuned = choose_head(encoder_weights, num_classes=7)
    assert tuned.state["head.weight"].shape == (7, 64) and not tuned.state["head.weight"].any()
    write_hf(tuned, tmp_path)

    with pytest.raises(WeightsError, match="pools by averaging"):
        write_hf(trained(pool="gap")[0], tmp_path / "gap")
    with pytest.raises(WeightsError, match="sin-cos"):
        write_timm(trained(pos_embed="sincos")[0], tmp_path / "sincos")
    with_representation = trained(representation_size=32)[0]
    with pytest.raises(WeightsError, match=r"no representation .* add --drop-representation"):
        write_hf(with_representation, tmp_path / "representation")
    with pytest.raises(WeightsError, match="cannot be kept without it"):
        choose_head(with_representation, keep_head=True, drop_representation=True)
    dropped = choose_head(with_representation, num_classes=3, drop_representation=True)
    assert not any(name.startswith("pre_logits") for name in dropped.state)
    assert dropped.model.build().load_state_dict(dropped.state) is not None


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_transformers_to_native_to_transformers_reproduces_every_tensor(tmp_path: Path):
    write_hf(trained()[0], tmp_path / "hf")
    write_native(from_hf(str(tmp_path / "hf")), tmp_path / "native")
    write_hf(read_native(str(tmp_path / "native")), tmp_path / "again")
    first, second = tensors(tmp_path / "hf"), tensors(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_timm_to_native_to_timm_reproduces_every_tensor(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=7)  # timm's own, not exported by us
    original = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(original, str(tmp_path / "timm.safetensors"))  # a bare state dict: heads from the width (Ti: 3)
    for source, target, out in (("timm.safetensors", "native", "native"), ("native", "timm", "again")):
        assert main([str(tmp_path / source), "--to", target, "--keep-head", "--out", str(tmp_path / out)]) == 0
    again = tensors(tmp_path / "again")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)
    ours = read_native(str(tmp_path / "native")).model.build().eval()
    ours.load_state_dict(original)
    with torch.no_grad():
        images = torch.randn(1, 3, 224, 224)
        assert relative_error(ours(images), model.eval()(images)) <= 1e-5


def test_larger_resolution_export_matches_our_model_run_at_that_resolution(tmp_path: Path, capsys):
    from transformers import ViTForImageClassification

    weights, ours = trained()
    write_native(weights, tmp_path / "native")
    assert (
        main(
            [str(tmp_path / "native"), "--to", "hf", "--keep-head", "--out", str(tmp_path / "hf"), "--image-size", "48"]
        )
        == 0
    )
    assert "48 px" in capsys.readouterr().out
    theirs = ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # ours resizes its 32 px table on the fly with the same function
        assert relative_error(theirs(pixel_values=images).logits, ours(images)) <= 1e-5


def test_bad_sources_get_one_line_errors(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path / "notes.txt"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    assert main([str(tmp_path / "empty"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert main([str(tmp_path / "bert"), "--to", "timm", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "folder").mkdir()
    assert main([str(tmp_path / "folder"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, errors
    assert "notes.txt: not a readable state dict" in errors[0]
    assert (
        errors[1]
        == f"error: {tmp_path / 'empty'}: no such file or folder; pass a checkpoint folder written by the trainer"
    )
    assert "bert" in errors[2]
    assert "folder: not a checkpoint (no latest file)" in errors[3]


def test_by_default_the_export_has_no_classifier_and_a_new_head_loads_as_asked(tmp_path: Path, capsys):
    from transformers import ViTForImageClassification, ViTModel

    weights, ours = trained()
    write_native(weights, tmp_path / "native")
    assert main([str(tmp_path / "native"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "no classifier written: --keep-head keeps the trained one" in capsys.readouterr().out
    assert not any(name.startswith("classifier") for name in tensors(tmp_path / "hf"))
    _, report = ViTForImageClassification.from_pretrained(tmp_path / "hf", num_labels=4, output_loading_info=True)
    assert sorted(report["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # the head asked to be new
    assert not report["unexpected_keys"] and not report["mismatched_keys"]
    encoder = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(encoder(pixel_values=images).last_hidden_state, ours.forward_features(images)) <= 1e-5
    with pytest.raises(SystemExit):  # argparse refuses the pair, naming both options
        main([str(tmp_path / "native"), "--to", "hf", "--keep-head", "--num-classes", "3", "--out", str(tmp_path)])
    assert "--num-classes: not allowed with argument --keep-head" in capsys.readouterr().err


def test_tensors_of_another_variant_are_refused_before_anything_is_written(tmp_path: Path, capsys):
    weights, _ = trained()
    check_weights(weights, "good")
    wider = Weights(weights.model.replace(mlp_dim=256), weights.state)
    with pytest.raises(
        WeightsError,
        match=r"ckpt: the tensors do not fit the model it describes \(64 wide, 2 "
        r"blocks.*blocks\.0\.mlp\.fc1\.weight is \(128, 64\), not \(256, 64\)",
    ):
        check_weights(wider, "ckpt")
    write_native(wider, tmp_path / "native")
    assert main([str(tmp_path / "native"), "--to", "timm", "--out", str(tmp_path / "timm")]) == 2
    assert "the tensors do not fit" in capsys.readouterr().err
    assert not (tmp_path / "timm").exists()


@pytest.mark.slow  # a full-size ResNet-50 stem, built four times
def test_hybrid_exports_to_timm_and_comes_back_unchanged(tmp_path: Path):
    weights, ours = trained(variant="R50+B/16", patch_size=None)
    assert weights.model.stem_stages == (3, 4, 9)
    write_timm(weights, tmp_path / "timm")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()  # strict
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(theirs(images), ours(images)) <= 1e-5
    assert main([str(tmp_path / "timm"), "--to", "native", "--keep-head", "--out", str(tmp_path / "native")]) == 0
    assert read_native(str(tmp_path / "native")).model == weights.model
    assert main([str(tmp_path / "native"), "--to", "timm", "--keep-head", "--out", str(tmp_path / "again")]) == 0
    first, again = tensors(tmp_path / "timm"), tensors(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)
    with pytest.raises(WeightsError, match="no ResNet stem; export hybrid models with --to timm"):
        write_hf(weights, tmp_path / "hf")
