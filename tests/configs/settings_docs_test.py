"""docs/settings.md is generated from the code's Setting lists and the config files: it must be current."""

import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_settings_page_is_current():
    tool = runpy.run_path(os.path.join(REPO, "tools", "make_settings_docs.py"))
    page = open(os.path.join(REPO, "docs", "settings.md")).read()
    assert page == tool["render"](), "docs/settings.md is stale: run 'python tools/make_settings_docs.py'"


def _fields(node, section):
    """(section, field) of every field under ``node``, nested sections (``label.amg``) included."""
    for key, value in node.items():
        yield section, key
        if hasattr(value, "items"):
            yield from _fields(value, key if section == "(top level)" else f"{section}.{key}")


def test_every_field_of_every_config_is_documented():
    tool = runpy.run_path(os.path.join(REPO, "tools", "make_settings_docs.py"))
    documented = {(section, s.name) for section, _, settings in tool["sections"]() for s in settings}
    checked = set()
    for name in tool["CONFIGS"]:
        config = tool["_config"](name)
        for section, field in _fields(config, "(top level)"):
            if "synthetic" in (section, field):  # smoke.py's knobs of its generated data, no package's settings
                continue
            if section == "(top level)" and hasattr(config[field], "items"):
                continue  # a section: its fields are checked
            assert (section, field) in documented, f"configs/{name}: {section}.{field} is not in docs/settings.md"
            checked.add(section)
    assert {"label", "label.amg"} <= checked  # the walk reaches the label section and its nested amg section
