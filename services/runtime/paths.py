"""Paths built from ids and names stay under the directory they belong to.

The contracts already refuse ids that could climb out (contracts/ids.py); this is the second line of
defence, at the place the path is made: whatever a value holds (`..`, an absolute path, a NUL, a
symlink planted inside the root), the resolved path must lie strictly inside its root, or nothing
is read, written or deleted.
"""

from __future__ import annotations

from pathlib import Path

from services.runtime.errors import FlywheelError


class PathOutsideRoot(FlywheelError):
    """A path built from an id or name would leave the directory it belongs to."""


def under(root: str | Path, *parts: str) -> Path:
    """`root / part / ...`, resolved; refused unless it lies strictly inside the resolved `root`."""
    base = Path(root).resolve()
    for part in parts:
        if not part or "\x00" in part:
            raise PathOutsideRoot(f"{part!r} cannot name a file under {base}: empty or holds a NUL byte")
        if Path(part).is_absolute() or "\\" in part:
            # Path(part) would replace the root outright; a backslash is a separator on Windows.
            raise PathOutsideRoot(f"{part!r} cannot name a file under {base}: absolute, or holds a backslash")
    target = base.joinpath(*parts).resolve()
    if base not in target.parents:
        raise PathOutsideRoot(f"{'/'.join(parts)!r} resolves to {target}, which is not inside {base}; refused")
    return target
