"""docs/settings.md is generated from the code's Setting lists and the config files: it must be current."""

import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_settings_page_is_current():
    tool = runpy.run_path(os.path.join(REPO, "tools", "make_settings_docs.py"))
    page = open(os.path.join(REPO, "docs", "settings.md")).read()
    assert page == tool["render"](), "docs/settings.md is stale: run 'python tools/make_settings_docs.py'"


def test_every_field_of_every_config_is_documented():
    tool = runpy.run_path(os.path.join(REPO, "tools", "make_settings_docs.py"))
    documented = {(section, s.name) for section, _, settings in tool["sections"]() for s in settings}
    for name in tool["CONFIGS"]:
        config = tool["_config"](name)
        for key, value in config.items():
            if hasattr(value, "items"):
                if key in ("synthetic", "label"):  # generated-data knobs of smoke.py; label: see its section
                    continue
                for field in value:
                    assert (key, field) in documented, f"configs/{name}: {key}.{field} is not in docs/settings.md"
            else:
                assert ("(top level)", key) in documented, f"configs/{name}: {key} is not in docs/settings.md"
