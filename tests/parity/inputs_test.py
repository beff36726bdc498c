"""Input mistakes of ``python -m zsp_jax.parity``: found before any work, one line each, exit code 2.

One subprocess checks the command-line behaviour (exit code, a single ``error:`` line, no traceback); the
other mistakes are checked in-process through ``zsp_jax.parity.inputs.check``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.parity.conftest import CLIP_NAME
from zsp_jax import cli
from zsp_jax.parity import inputs
from zsp_jax.parity.__main__ import parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_command_line_mistake_is_one_error_line_and_exit_2(files, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zsp_jax.parity", "--sam", str(tmp_path / "missing.pth"), "--clip", files["clip_bin"],
           "--clip_model_name", CLIP_NAME, "--images", files["images"], "--config", files["config"], "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --sam: SAM checkpoint") and "missing.pth" in lines[0], lines
    assert "Traceback" not in done.stderr and "estimate" not in done.stdout  # nothing ran
    assert not (out / "parity.json").exists()


def _problems(argv: list[str]) -> list[str]:
    with pytest.raises(cli.UsageError) as raised:
        inputs.check(parser().parse_args(argv))
    return str(raised.value).splitlines()


@pytest.fixture
def args(files, tmp_path) -> dict[str, str]:
    return {"--sam": files["sam_pth"], "--clip": files["clip_bin"], "--clip_model_name": CLIP_NAME,
            "--images": files["images"], "--config": files["config"], "--out": str(tmp_path / "out")}


def _argv(args: dict[str, str], **changes: str | None) -> list[str]:
    merged = {**args, **{f"--{k}": v for k, v in changes.items()}}
    return [x for k, v in merged.items() if v is not None and k.startswith("--") for x in (k, v)]


def _backbone_file(tmp_path) -> str:
    import torch

    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.references.deeplab import torch_reference

    path = str(tmp_path / "resnet.pth")
    torch.save(torch_reference(DeepLabConfig.tiny_resnet()).backbone.state_dict(), path)
    return path


def _bad_image_folder(tmp_path) -> str:
    folder = tmp_path / "bad_images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    return str(folder)


CASES = {
    "empty image folder": (lambda a, t: _argv(a, images=str(t)), "--images=", "no images there"),
    "undecodable image": (lambda a, t: _argv(a, images=_bad_image_folder(t)), "--images: ", "cannot decode"),
    "converted SAM without its original": (lambda a, t: _argv(a, sam=a["_sam_st"]), "--sam=",
                                           "give the one it was converted from with --sam_reference"),
    "open_clip file without a model name": (lambda a, t: _argv(a, clip_model_name=None), "--clip: ",
                                            "does not record its activation"),
    "unknown open_clip model name": (lambda a, t: _argv(a, clip_model_name="ViT-Q-99"), "--clip_model_name=ViT-Q-99",
                                     "not an open_clip model name"),
    "unknown dtype": (lambda a, t: _argv(a, dtype="float16"), "--dtype=float16", "expected a comma-separated list"),
    "output is a file": (lambda a, t: _argv(a, out=a["--config"]), "--out=", "is a file, not a directory"),
    "missing config file": (lambda a, t: _argv(a, config=str(t / "nope.py")), "--config=", "no such config file"),
    "backbone-only DeepLab file": (lambda a, t: _argv(a, deeplab=_backbone_file(t)), "--deeplab=",
                                   "give a trained DeepLabV3+ checkpoint"),
    "unknown class list": (lambda a, t: _argv(a, classes="not-a-list"), "--classes=not-a-list", "not 'voc'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_naming_the_flag(files, args, tmp_path, case):
    build, flag, words = CASES[case]
    lines = _problems(build({**args, "_sam_st": files["sam_st"]}, tmp_path))
    assert len(lines) == 1, lines
    assert lines[0].startswith(flag) and words in lines[0], lines[0]
    assert not (tmp_path / "out" / "parity.json").exists()


def test_several_mistakes_give_one_line_each(args, tmp_path):
    lines = _problems(_argv(args, dtype="float16", matmul_precision="fastest", images=str(tmp_path)))
    assert [line.split("=")[0] for line in lines] == ["--dtype", "--matmul_precision", "--images"], lines
