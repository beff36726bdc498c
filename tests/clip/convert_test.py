"""Conversion from the three checkpoint formats, the converted file, and the guards."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from zsp_jax.models import clip
from zsp_jax.models.clip import convert as clip_convert
from zsp_jax.references import clip as clip_refs
from zsp_jax.utils.bench import relative_error
from zsp_jax.utils.weights import ConversionError, load_weights


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _image_embeds(model, images):
    return clip.encode_image_fn(model)(images)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_hf):
    model, _, _ = tiny_hf
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d / "safetensors")
    model.save_pretrained(d / "bin", safe_serialization=False) if _supports_bin(model) else None
    return d


def _supports_bin(model) -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(model.save_pretrained).parameters


def test_hf_directory(hf_dir, tiny_hf):
    _, _, from_memory = tiny_hf
    converted = clip_convert.convert_checkpoint(hf_dir / "safetensors")
    assert converted.source_format == "hf" and converted.config == from_memory.config
    _same_weights(converted.weights, from_memory.weights)


def test_hf_directory_bin(tmp_path, tiny_hf):
    model, _, from_memory = tiny_hf
    d = tmp_path / "bin"
    d.mkdir()
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    converted = clip_convert.convert_checkpoint(d)
    _same_weights(converted.weights, from_memory.weights)


def test_hf_directory_sharded(tmp_path, tiny_hf):
    """A sharded safetensors checkpoint (index + two files), old position_ids buffers included."""
    import json

    from safetensors.torch import save_file

    model, _, from_memory = tiny_hf
    model.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    _same_weights(clip_convert.convert_checkpoint(tmp_path).weights, from_memory.weights)


def test_openai_torchscript_fp16(tmp_path):
    """A TorchScript archive of an OpenAI-layout model with fp16 weights, as OpenAI distributes."""
    model = clip_refs.tiny_open_clip(quick_gelu=True, seed=11)
    with torch.no_grad():  # make every weight fp16-representable, then save the fp16 copy
        for p in model.parameters():
            p.copy_(p.half().float())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(model.half()), str(path))
    model.float()
    assert clip_convert.is_torchscript_archive(str(path)) and clip_convert.detect_format(path) == "openai"
    converted = clip_convert.convert_checkpoint(path)
    assert converted.source_format == "openai" and converted.config.act == "quick_gelu"
    reference = clip_convert.convert_state_dict(model.state_dict(), "open_clip", act="quick_gelu")
    _same_weights(converted.weights, reference.weights)
    images = clip_refs.random_images(2, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert relative_error(_image_embeds(converted.build(), images), ref) <= 1e-5


def test_openai_plain_state_dict(tmp_path, tiny_open_clip):
    """OpenAI's non-TorchScript .pt: a state_dict with the integers OpenAI keeps beside the weights."""
    torch_model, from_memory = tiny_open_clip
    sd = dict(torch_model.state_dict())
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "plain.pt")
    converted = clip_convert.convert_checkpoint(tmp_path / "plain.pt")  # detected by input_resolution
    assert converted.source_format == "openai" and converted.config.act == "quick_gelu"
    _same_weights(converted.weights, from_memory.weights)


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint", "safetensors", "custom_text"])
def test_open_clip(tmp_path, layout):
    torch_model = clip_refs.tiny_open_clip(quick_gelu=False, seed=12, custom_text=layout == "custom_text")
    sd = torch_model.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "epoch_1.pt"
        obj = {"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}} \
            if layout == "training_checkpoint" else sd
        torch.save(obj, path)
    converted = clip_convert.convert_checkpoint(path, model_name="ViT-B-16")
    assert converted.source_format == "open_clip" and converted.config.act == "gelu"
    ours = converted.build()
    images = clip_refs.random_images(2, 32, 32, seed=3)
    ids = np.zeros((2, 77), np.int64)
    ids[:, :4] = [[49406, 320, 2368, 49407], [49406, 1929, 269, 49407]]
    with torch.no_grad():
        ref_img = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        ref_txt = torch_model.encode_text(torch.from_numpy(ids)).numpy()
    assert relative_error(_image_embeds(ours, images), ref_img) <= 1e-5
    assert relative_error(clip.encode_text_fn(ours)(ids), ref_txt) <= 1e-5


@pytest.mark.parametrize("name,act", [(None, "gelu"), ("ViT-B-16", "gelu"), ("ViT-B-16-quickgelu", "quick_gelu"),
                                      ("ViT-L-14/openai", "quick_gelu"), ("ViT-L-14-336-quickgelu", "quick_gelu")])
def test_open_clip_activation_from_name(name, act):
    assert clip_convert.act_from_open_clip_name(name) == act


def test_named_variants_from_shapes():
    """Architecture inference on the real variants' shapes (abstract, nothing allocated)."""
    import jax

    for variant in clip.VARIANTS:
        cfg = getattr(clip.ClipConfig, variant)()
        shapes = clip_convert.expected_shapes(cfg)
        fake = {}
        inverse = {"visual.patch_embed": ("visual.conv1.weight", lambda s: (s[3], s[2], s[0], s[1])),
                   "visual.pos_embed": ("visual.positional_embedding", None), "visual.proj": ("visual.proj", None),
                   "text.pos_embed": ("positional_embedding", None),
                   "text.token_embedding.embedding": ("token_embedding.weight", None),
                   "text.ln_final.scale": ("ln_final.weight", None), "text.proj": ("text_projection", None),
                   "visual.blocks.0.mlp.fc1.kernel": ("visual.transformer.resblocks.0.mlp.c_fc.weight",
                                                      lambda s: s[::-1]),
                   "text.blocks.0.mlp.fc1.kernel": ("transformer.resblocks.0.mlp.c_fc.weight", lambda s: s[::-1])}
        for ours, (theirs, fn) in inverse.items():
            s = tuple(shapes[ours].shape)
            fake[theirs] = jax.ShapeDtypeStruct(fn(s) if fn else s, np.float32)
        for tower, prefix, n in (("visual", "visual.transformer.resblocks", cfg.vision_layers),
                                 ("text", "transformer.resblocks", cfg.text_layers)):
            for i in range(n):
                fake[f"{prefix}.{i}.attn.in_proj_weight"] = jax.ShapeDtypeStruct((1,), np.float32)
        inferred = clip_convert.config_from_openai_state_dict(fake, act="quick_gelu", source_name=variant)
        assert inferred == cfg and inferred.variant_name() == variant


def test_save_and_load(tmp_path, tiny_open_clip):
    torch_model, converted = tiny_open_clip
    path = tmp_path / "tiny.safetensors"
    converted.save(path)
    assert clip.read_clip_config(path) == converted.config
    loaded = clip.load_clip(path)
    images = clip_refs.random_images(1, 32, 32)
    np.testing.assert_array_equal(_image_embeds(loaded, images), _image_embeds(converted.build(), images))
    bf16 = clip.load_clip(path, dtype="bfloat16")
    assert bf16.visual.proj.get_value().dtype == np.dtype("bfloat16")


def test_convert_tool(tmp_path, hf_dir, tiny_hf, tiny_open_clip):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_clip", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_clip.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "tiny_hf.safetensors"
    assert tool.main([str(hf_dir / "safetensors"), str(out), "--check"]) == 0
    _same_weights(clip.load_clip(out) and load_weights(out)[0], tiny_hf[2].weights)
    tok = clip.ClipTokenizer.load(tool.tokenizer_dir_for(str(out)))
    assert tok(["a photo of a cat."])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert tool.main([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 2
    # the output may be neither the source file nor a directory; the source stays intact
    src = tmp_path / "open_clip.pt"  # a valid checkpoint, so only the guard can refuse it
    torch.save(tiny_open_clip[0].state_dict(), src)
    before = src.read_bytes()
    assert tool.main([str(src), str(src), "--no-tokenizer"]) == 2 and src.read_bytes() == before
    assert tool.main([str(hf_dir / "safetensors"), str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- guards


def test_truncated_files(tmp_path, tiny_open_clip):
    torch_model, _ = tiny_open_clip
    full = tmp_path / "full.pt"
    torch.save(torch_model.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pt"):
        clip_convert.convert_checkpoint(cut)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch_model), str(script))
    data = script.read_bytes()
    (tmp_path / "script_cut.pt").write_bytes(data[: len(data) - 2000])
    with pytest.raises(ConversionError):
        clip_convert.convert_checkpoint(tmp_path / "script_cut.pt", fmt="openai")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match="empty"):
        clip_convert.convert_checkpoint(tmp_path / "empty.pt")


def test_truncated_safetensors(tmp_path, tiny_open_clip):
    from safetensors.torch import save_file

    torch_model, _ = tiny_open_clip
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="m.safetensors"):
        clip_convert.convert_checkpoint(path)


def test_missing_and_extra_tensors(tiny_open_clip):
    torch_model, _ = tiny_open_clip
    sd = dict(torch_model.state_dict())
    del sd["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    sd["visual.some_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as e:
        clip_convert.convert_state_dict(sd, "open_clip")
    msg = str(e.value)
    assert "visual.some_adapter.weight" in msg and "visual.blocks.1.mlp.fc2.bias" in msg


def test_shape_mismatch(tiny_open_clip):
    torch_model, _ = tiny_open_clip
    sd = dict(torch_model.state_dict())
    sd["visual.transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(128, 64)
    with pytest.raises(ConversionError, match="shape mismatches"):
        clip_convert.convert_state_dict(sd, "open_clip")


def test_foreign_checkpoints(tmp_path, tiny_hf):
    with pytest.raises(ConversionError, match="not an OpenAI/open_clip CLIP ViT"):
        clip_convert.convert_state_dict({"image_encoder.patch_embed.proj.weight": torch.zeros(2)}, "open_clip")
    with pytest.raises(ConversionError, match="transformers checkpoint"):
        clip_convert.convert_state_dict(tiny_hf[0].state_dict(), "open_clip")
    with pytest.raises(ConversionError, match="ResNet"):
        clip_convert.convert_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(2)}, "openai")
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_convert.convert_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        clip_convert.convert_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.safetensors"
    from zsp_jax.utils.weights import save_weights

    save_weights(other, {"a": np.zeros(2, np.float32)}, {"zsp_jax.model": "sam"})
    with pytest.raises(ConversionError, match="'sam'"):
        clip.load_clip(other)


def test_zip_that_is_not_torchscript(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", b"not a pickle")
    assert not clip_convert.is_torchscript_archive(str(path))
    with pytest.raises(ConversionError):
        clip_convert.convert_checkpoint(path)


def _open_clip_configs():
    import glob
    import json

    import open_clip

    out = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "*.json"))):
        with open(path) as f:
            cfg = json.load(f)
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        # CLIP ViTs (no timm tower) with CLIP's own text transformer: what the converter accepts.
        if isinstance(vision.get("width"), int) and isinstance(vision.get("layers"), int) \
                and not vision.get("timm_model_name") and isinstance(text.get("width"), int):
            out.append((os.path.basename(path)[:-5], vision["width"], vision.get("head_width", 64)))
    return out


def test_vision_head_width_table_matches_open_clip_configs():
    """Every ViT config open_clip ships gets its own head width from the name rule (ViT-H 80, g 88, ...)."""
    configs = _open_clip_configs()
    assert len(configs) > 30 and sum(h != 64 for _, _, h in configs) >= 10
    for name, width, head in configs:
        assert clip_convert.vision_head_width(name, width) == head, name
        assert clip_convert.vision_head_width(name + "/laion2b_s32b_b79k", width) == head, name


def _wide_head_open_clip(seed=21):
    """A tiny open_clip CLIP whose vision heads are 80 wide (4 heads at width 320; width / 64 would say 5)."""
    return clip_refs.open_clip_model(dict(layers=2, width=320, head_width=80, patch_size=8, image_size=32),
                                        dict(context_length=77, width=64, heads=1, layers=2), 16,
                                        quick_gelu=False, seed=seed)


@pytest.mark.parametrize("how", ["name", "config_json", "explicit"])
def test_wide_head_models_convert_right(tmp_path, how):
    import json

    torch_model = _wide_head_open_clip()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(torch_model.state_dict(), path)
    kwargs = {"name": dict(model_name="ViT-H-14"), "explicit": dict(vision_head_width=80, act="gelu")}.get(how)
    if how == "config_json":
        cfg = tmp_path / "ViT-custom.json"
        cfg.write_text(json.dumps({"vision_cfg": {"width": 320, "head_width": 80}}))
        kwargs = dict(model_name=str(cfg))
    converted = clip_convert.convert_checkpoint(path, **kwargs)
    assert converted.config.vision_heads == 4
    images = clip_refs.random_images(2, 32, 32, seed=4)
    with torch.no_grad():
        ref = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert relative_error(_image_embeds(converted.build(), images), ref) <= 1e-5
    # The 64-wide default on the same file converts without error but computes something else: the reason
    # the wide-head families are refused by width when no name is given.
    wrong = clip_convert.convert_checkpoint(path, vision_head_width=64, act="gelu")
    assert relative_error(_image_embeds(wrong.build(), images), ref) > 1e-2


def test_wide_head_width_without_a_name_is_refused():
    import jax

    fake = {"visual.conv1.weight": jax.ShapeDtypeStruct((1280, 3, 14, 14), np.float32),
            "visual.positional_embedding": jax.ShapeDtypeStruct((257, 1280), np.float32),
            "visual.proj": jax.ShapeDtypeStruct((1280, 1024), np.float32),
            "positional_embedding": jax.ShapeDtypeStruct((77, 1024), np.float32),
            "token_embedding.weight": jax.ShapeDtypeStruct((49408, 1024), np.float32),
            "ln_final.weight": jax.ShapeDtypeStruct((1024,), np.float32),
            "text_projection": jax.ShapeDtypeStruct((1024, 1024), np.float32)}
    with pytest.raises(ConversionError, match=r"ViT-H.*--model-name"):
        clip_convert.config_from_openai_state_dict(fake, act="gelu", source_name="vit_h.bin")
    cfg = clip_convert.config_from_openai_state_dict(fake, act="gelu", source_name="vit_h.bin", model_name="ViT-H-14")
    assert cfg.vision_heads == 16
    with pytest.raises(ConversionError, match="not a multiple"):
        clip_convert.config_from_openai_state_dict(fake, act="gelu", source_name="x", model_name="ViT-g-14")


def test_open_clip_state_dict_without_a_model_name_is_refused_not_guessed(tmp_path):
    # QuickGELU (OpenAI's weights) and GELU (open_clip's own) models have identical tensors: converting as
    # either without being told would give silently wrong features.
    torch_model = clip_refs.tiny_open_clip(quick_gelu=True, seed=13)
    path = tmp_path / "open_clip_model.bin"
    torch.save(torch_model.state_dict(), path)
    with pytest.raises(ConversionError, match="does not record its activation") as e:
        clip_convert.convert_checkpoint(path)
    assert "--clip_model_name" in str(e.value) and "ViT-B-16-quickgelu" in str(e.value) and "GELU" in str(e.value)
    assert clip_convert.convert_checkpoint(path, model_name="ViT-B-16-quickgelu").config.act == "quick_gelu"
    assert clip_convert.convert_checkpoint(path, model_name="ViT-B-16").config.act == "gelu"
    config_json = tmp_path / "ViT-tiny.json"
    config_json.write_text(json.dumps({"embed_dim": 32, "quick_gelu": True, "vision_cfg": {}}))
    assert clip_convert.convert_checkpoint(path, model_name=str(config_json)).config.act == "quick_gelu"
