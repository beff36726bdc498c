"""``python -m zsp_jax.parity`` on the tiny random checkpoints of the smoke default (PyTorch-format originals
on the reference side, converted on ours as the labeller converts them), run in-process.

* the originals pass: exit 0, every component (SAM, AMG, CLIP, labeller, DeepLab) compared something, and
  the AMG / labeller rows say that they compared the candidates before the filters (random weights keep
  no mask under the default filters, so a comparison at those settings would be vacuous);
* a converted ``.safetensors`` on our side with the original on theirs passes, and its bfloat16 run
  reports figures (no verdict);
* a wrong conversion fails (exit 1) and names the component: two swapped SAM tensors; the QuickGELU /
  GELU mix-up of an open_clip file, in the labeller's own conversion and in a converted file.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.parity.conftest import CLIP_NAME, finite, read_report
from zsp_jax.parity import ours
from zsp_jax.parity.__main__ import main


def _out(args: list[str]) -> str:
    return args[args.index("--out") + 1]


def test_originals_pass_and_every_component_compares_something(files, base_args, capsys):
    args = base_args + ["--deeplab", files["deeplab_pth"], "--deeplab_size", "65"]
    code = main(args)
    printed = capsys.readouterr().out
    report = read_report(_out(args))
    assert code == 0, report["failures"]
    assert report["passed"] and "PASS" in printed
    components = {r["component"] for r in report["rows"]}
    assert components == {"sam.image_embedding", "sam.point_logits", "sam.iou_predictions", "amg.masks",
                          "clip.text_embeddings", "clip.gem_features", "label.pixels", "label.segment_classes",
                          "label.segment_scores", "deeplab.logits", "deeplab.argmax"}
    for row in report["rows"]:
        assert row["count"] > 0 and finite(row["worst"]) and row["verdict"] == "pass", row
    # Random weights: the default filters keep nothing, so the candidates were compared, and the report says so.
    amg = next(r for r in report["rows"] if r["component"] == "amg.masks")
    assert "candidates before the filters" in amg["note"] and amg["count"] >= 2 * 48
    assert "BEFORE the filters" in report["notes"]["amg"] and "BEFORE the filters" in printed
    pixels = next(r for r in report["rows"] if r["component"] == "label.pixels")
    assert pixels["count"] == 80 * 96 + 96 * 72
    with open(os.path.join(_out(args), "parity.md")) as f:
        assert "| label.pixels | float32/highest |" in f.read()


def test_converted_files_with_originals_pass_and_bfloat16_reports_figures(files, base_args):
    args = base_args + ["--sam", files["sam_st"], "--sam_reference", files["sam_pth"], "--clip", files["clip_st"],
                        "--clip_reference", files["clip_bin"], "--components", "sam,clip",
                        "--dtype", "float32,bfloat16"]
    assert main(args) == 0
    report = read_report(_out(args))
    assert report["runs"] == ["float32/highest", "bfloat16/highest"]
    extra = [r for r in report["rows"] if r["run"] == "bfloat16/highest"]
    assert {r["component"] for r in extra} == {"sam.image_embedding", "sam.point_logits", "sam.iou_predictions",
                                               "clip.text_embeddings", "clip.gem_features"}
    for row in extra:  # figures, no verdict; bf16 really ran (its error is far above float32's)
        assert row["verdict"] == "-" and row["tolerance"] is None and row["count"] > 0
        assert 1e-4 < row["worst"] < 0.5, row
    with open(os.path.join(_out(args), "parity.md")) as f:
        assert "Other dtypes" in f.read()


@pytest.mark.parametrize("source", ["hf_clip", "openai_pt"])
def test_transformers_and_openai_clip_files_pass(files, base_args, source):
    """A transformers directory: GEM needs open_clip, so the reference copies the weights into open_clip and
    checks that copy against transformers itself (``clip.reference_layout``). An OpenAI TorchScript .pt with
    fp16 weights: QuickGELU without a model name."""
    args = base_args + ["--clip", files[source], "--clip_model_name", "", "--components", "clip"]
    assert main(args) == 0
    rows = {r["component"]: r for r in read_report(_out(args))["rows"]}
    expected = {"clip.text_embeddings", "clip.gem_features"} | ({"clip.reference_layout"} if source == "hf_clip"
                                                                  else set())
    assert set(rows) == expected
    assert all(r["verdict"] == "pass" and r["count"] > 0 for r in rows.values())


@pytest.fixture
def swapped_sam_tensors():
    """A wrong conversion on our side: the first two encoder blocks' MLP kernels swapped."""
    def swap(kind, model):
        if kind == "sam":
            a, b = (model.image_encoder.blocks[i].mlp.lin1.kernel for i in (0, 1))
            va, vb = a.get_value(), b.get_value()
            a.set_value(vb)
            b.set_value(va)

    ours.MODEL_HOOKS.append(swap)
    yield
    ours.MODEL_HOOKS.remove(swap)


def test_swapped_tensors_fail_naming_the_component(base_args, swapped_sam_tensors, capsys):
    """The SAM rows fail; the labeller's maps differ and the report shows them side by side."""
    args = base_args + ["--components", "sam,label"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "FAIL sam.image_embedding: max rel" in printed and "FAIL label.pixels: agree" in printed
    assert not any(line.startswith("error:") for line in printed.splitlines())
    report = read_report(_out(args))
    assert not report["passed"] and report["failures"][0].startswith("FAIL sam.image_embedding")
    assert report["pictures"] and os.path.exists(os.path.join(_out(args), report["pictures"][0]))
    with open(os.path.join(_out(args), "parity.md")) as f:
        assert f"]({report['pictures'][0]})" in f.read()


@pytest.mark.parametrize("route", ["label_conversion", "converted_file"])
def test_quickgelu_gelu_mixup_fails_naming_the_component(files, base_args, tmp_path, capsys, route):
    """OpenAI-trained (QuickGELU) open_clip weights read as GELU: by the labeller's conversion of the file
    (``--clip_model_name ViT-B-16`` while the original is ``ViT-B-16-quickgelu``), or in a converted file."""
    if route == "label_conversion":
        args = base_args + ["--clip_model_name", "ViT-B-16", "--clip_reference_model_name", CLIP_NAME]
    else:
        from zsp_jax.models.clip import convert as clip_convert

        wrong = str(tmp_path / "clip_gelu.safetensors")
        clip_convert.save_clip(wrong, clip_convert.convert_checkpoint(files["clip_bin"], model_name="ViT-B-16"))
        args = base_args + ["--clip", wrong, "--clip_reference", files["clip_bin"]]
    assert main(args + ["--components", "clip"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL clip.gem_features: max rel" in printed and "FAIL clip.text_embeddings" in printed
    report = read_report(_out(args))
    assert "QuickGELU" in report["notes"]["clip"]
    assert json.dumps(report)  # the report is written on failure too
