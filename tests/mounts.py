"""A small tmpfs mounted for one test: a real read-only or full file system, to see what a user's would do.

Mounting needs root with CAP_SYS_ADMIN (a VM, or a privileged container). Where that is not allowed,
:func:`tmpfs` skips the test that asked, saying why, and :func:`tmpfs_if_allowed` yields None so the test
can use a check that needs no mount (a path through a file) instead.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(args: list[str]) -> tuple[bool, str]:
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return False, "no mount command"
    return done.returncode == 0, done.stderr.strip() or f"mount exited {done.returncode}"


@contextmanager
def tmpfs_if_allowed(path: Path, options: str) -> Iterator[Path | None]:
    """A tmpfs at ``path`` (created) with mount ``options`` (e.g. ``ro,size=64k``), unmounted afterwards;
    None when this machine does not let the tests mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted, _ = _mount(["-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if not mounted:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """:func:`tmpfs_if_allowed`, skipping the test where no tmpfs can be mounted."""
    with tmpfs_if_allowed(path, options) as mounted:
        if mounted is None:
            pytest.skip(f"cannot mount a tmpfs here ({_mount(['-t', 'tmpfs', 'tmpfs', str(path)])[1]}): this "
                        "check needs root with CAP_SYS_ADMIN")
        yield mounted


def remount_read_only(path: Path) -> None:
    """Make a tmpfs mounted by :func:`tmpfs` read-only from now on."""
    mounted, error = _mount(["-o", "remount,ro", str(path)])
    assert mounted, error
