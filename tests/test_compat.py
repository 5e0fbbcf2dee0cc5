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
    sys.modules.pop("moeclip.detector", None)  # an earlier test may have imported it already
    with pytest.warns(DeprecationWarning):
        from moeclip.detector import Detector  # noqa: F401
    from moeclip.inference.detector import Detector as new

    assert Detector is new
