"""Model path resolution: files inside installed packages (the embedded model's route), bad paths."""
from __future__ import annotations

import sys

import pytest

from harness.errors import UserError
from harness.models import resolve_dtype, resolve_path


def test_pkg_path_points_into_the_installed_package_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg_embedded"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_path("pkg://fakepkg_embedded/model.gguf") == str(pkg / "model.gguf")
    assert "fakepkg_embedded" not in sys.modules
    with pytest.raises(UserError) as info:
        resolve_path("pkg://fakepkg_embedded/other.gguf")
    assert info.value.key == "model.path"


def test_missing_package_names_the_install_command():
    with pytest.raises(UserError) as info:
        resolve_path("pkg://no_such_package_here/x.gguf")
    assert info.value.key == "model.path" and "pip install --no-deps no-such-package-here" in info.value.fix


def test_plain_paths_pass_through_and_dtypes_are_checked():
    assert resolve_path("facebook/opt-125m") == "facebook/opt-125m"
    with pytest.raises(UserError) as info:
        resolve_dtype("float8")
    assert info.value.key == "model.dtype"
