"""docs/api.md is generated from the code (docs/make_api.py): it must be up to date, name every public
function and every registered method, and describe every method option."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import lightning_lora as ll

ROOT = Path(__file__).resolve().parents[2]


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI_HEADING = "## `lncrna` command line"


def test_api_reference_is_up_to_date():
    """The library's part exactly; the command line's help exactly on Python 3.11, the version the file
    is generated with (argparse's layout changed in 3.13: ``-o, --output OUT``)."""
    expected_lib, _, expected_cli = _make_api().render().partition(CLI_HEADING)
    current_lib, _, current_cli = (ROOT / "docs" / "api.md").read_text(encoding="utf-8").partition(CLI_HEADING)
    message = "docs/api.md is out of date: run python docs/make_api.py (with Python 3.11)"
    assert current_lib == expected_lib, message
    if sys.version_info[:2] == (3, 11):
        assert current_cli == expected_cli, message
    else:
        assert current_cli.count("### `lncrna ") == expected_cli.count("### `lncrna "), message


def test_every_public_name_and_method_has_a_section():
    text = _make_api().render()
    for name in ll.__all__:
        assert f"### `ll.{name}" in text, name
    for method in ll.available_methods():
        assert f"### `{method}` (" in text, method
    for command in ("predict", "evaluate", "train", "pretrain"):
        assert f"### `lncrna {command}`" in text, command


def test_every_method_option_has_a_meaning():
    """An option row with an empty meaning is a config field its class docstring does not describe
    (in its ``Attributes:`` section, one entry per field, or ``a, b: ...``)."""
    empty = re.findall(r"^\| `(\w+)` \| `[^`]*` \|\s*\|$", _make_api().render(), flags=re.M)
    assert not empty, f"undocumented options: {empty}"
