"""A small tmpfs mounted for one test: a real read-only or full file system, to see what a user's would do.

Mounting needs root with CAP_SYS_ADMIN (a VM, or a privileged container). Where that is not allowed the
test that asked is skipped, saying why; checks that need no mount (a path through a file) run everywhere.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(args: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``path`` (created) with mount ``options`` (e.g. ``ro,size=64k``), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    done = _mount(["-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if done is None or done.returncode != 0:
        why = "no mount command" if done is None else (done.stderr.strip() or f"mount exited {done.returncode}")
        pytest.skip(f"cannot mount a tmpfs here ({why}): this check needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount_read_only(path: Path) -> None:
    """Make a tmpfs mounted by :func:`tmpfs` read-only from now on."""
    done = _mount(["-o", "remount,ro", str(path)])
    assert done is not None and done.returncode == 0, done and done.stderr
