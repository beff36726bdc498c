"""Class lists and label options: what users write, and the errors that name the culprit."""

import pytest

from zsp_jax.label.classes import MAX_CLASSES, load_classes
from zsp_jax.label.options import LabelOptions, default_label_config


def test_builtin_lists():
    voc = load_classes("voc")
    assert voc.num_labels == 21 and voc.names[0] == "background" and voc.prompts[0] == ()
    assert voc.prompts[20] == ("tv monitor",)
    coco = load_classes("coco")
    assert coco.num_labels == 81 and coco.names[1] == "person"
    texts, labels = voc.prompt_rows()
    assert len(texts) == 20 and labels.tolist() == list(range(1, 21))


def test_class_file_with_prompts_comments_and_background(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncat\n\ntvmonitor: tv monitor; television  # synonyms\nbackground: sky; wall\n")
    c = load_classes(str(f))
    assert c.names == ("background", "cat", "tvmonitor")
    assert c.prompts == (("sky", "wall"), ("cat",), ("tv monitor", "television"))
    texts, labels = c.prompt_rows()
    assert texts == ["sky", "wall", "cat", "tv monitor", "television"] and labels.tolist() == [0, 0, 1, 2, 2]
    assert load_classes("cat, dog").names == ("background", "cat", "dog")


@pytest.mark.parametrize("text,match", [
    ("", "no classes"), ("# only a comment\n", "no classes"), ("cat\ndog\nCat\n", r":3: duplicate class 'Cat'"),
    ("cat: kitten;\n", "empty prompt"), (": x\n", "empty class name"), ("cat\ndog: cat\n", "already a prompt of 'cat'"),
    ("background\ncat\n", "needs prompts"), ("background: a\nbackground: b\ncat\n", "given twice"),
    ("\n".join(f"c{i}" for i in range(MAX_CLASSES + 1)), "at most 254"),
])
def test_class_file_errors(tmp_path, text, match):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_classes(str(f))


def test_unknown_source():
    with pytest.raises(ValueError, match="not 'voc', 'coco'"):
        load_classes("no_such_file.txt")


@pytest.mark.parametrize("field,value,match", [
    ("no_class", "maybe", "label.no_class"), ("threshold", 1.5, "label.threshold"),
    ("paint_order", "random", "label.paint_order"), ("pooling", "max", "label.pooling"),
    ("letterbox", 2048, "label.letterbox"), ("background_prompts", "sky;", "label.background_prompts"),
])
def test_options_name_the_bad_field(field, value, match):
    c = default_label_config()
    c[field] = value
    with pytest.raises(ValueError, match=match):
        LabelOptions.from_config(c, load_classes("voc"))


def test_amg_errors_name_the_section():
    c = default_label_config()
    c.amg.points_per_side = 0
    with pytest.raises(ValueError, match="label.amg"):
        LabelOptions.from_config(c, load_classes("voc"))


def test_background_prompts_and_fingerprint():
    c = default_label_config()
    c.background_prompts = "sky; wall"
    o = LabelOptions.from_config(c, load_classes("voc"))
    assert o.classes.prompts[0] == ("sky", "wall") and o.rules().row_labels[:2] == (0, 0)
    c2 = default_label_config()
    c2.write_overlays = True  # output choices do not change the labels
    assert LabelOptions.from_config(c2, load_classes("voc")).fingerprint() == \
        LabelOptions.from_config(default_label_config(), load_classes("voc")).fingerprint()
    c2.threshold = 0.3
    assert LabelOptions.from_config(c2, load_classes("voc")).fingerprint()["threshold"] == 0.3
