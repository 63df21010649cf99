from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.base.paths import Root, SymlinkLoopError


def test_absolute_links_resolve_inside_the_root(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    (tmp_path / "usr/src/headers").mkdir(parents=True)
    moddir = tmp_path / "lib/modules/6.0"
    moddir.mkdir(parents=True)
    (moddir / "build").symlink_to("/usr/src/headers")
    assert root.resolve(moddir / "build") == tmp_path / "usr/src/headers"
    assert root.outside(root.resolve(moddir / "build")) == "/usr/src/headers"


def test_dotdot_and_relative_links_never_leave_the_root(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/up").symlink_to("../../../../etc")
    (tmp_path / "a/abs").symlink_to("/etc/../../../passwd")
    assert root.resolve(tmp_path / "a/up") == tmp_path / "etc"
    assert root.resolve(tmp_path / "a/abs") == tmp_path / "passwd"


def test_a_link_loop_is_an_error_never_a_path_the_host_would_follow(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    (tmp_path / "x").symlink_to("/y")
    (tmp_path / "y").symlink_to("/x")
    with pytest.raises(SymlinkLoopError, match="too many levels of symbolic links in the root"):
        root.resolve(tmp_path / "x/inner")


def test_well_known_locations_are_under_the_prefix(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    assert root.modules_dirs == (tmp_path / "lib/modules", tmp_path / "usr/lib/modules")
    assert root.state_dir == tmp_path / "var/lib/kmodd"
    assert root.path("/boot/x") == tmp_path / "boot/x"
