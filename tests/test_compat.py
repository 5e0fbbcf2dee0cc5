"""The layered layout keeps the old module paths of public names working (with a warning)."""
import importlib
import sys

import pytest

from moeclip._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module(old):
    new = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)


def test_old_from_import_of_public_names():
    sys.modules.pop("moeclip.detector", None)  # the parametrised test above may have imported it
    with pytest.warns(DeprecationWarning):
        from moeclip.detector import Detector  # noqa: F401
    from moeclip.inference.detector import Detector as new

    assert Detector is new


def test_alias_keeps_the_new_module_a_package():
    """Importing an old package path must not turn the new package into a plain module."""
    from importlib import resources

    sys.modules.pop("moeclip.serve", None)
    with pytest.warns(DeprecationWarning):
        importlib.import_module("moeclip.serve")
    new = importlib.import_module("moeclip.inference.serve")
    assert new.__spec__.name == "moeclip.inference.serve"
    assert resources.files("moeclip.inference.serve").joinpath("static/index.html").is_file()
