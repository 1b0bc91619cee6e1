"""Files written whole or not at all: the package's one atomic-write helper.

The content goes to a hidden temporary file beside the target, which is renamed onto the target (``os.replace``,
atomic within one file system) only once it is complete. A reader never sees a half-written file, and an
interrupted run leaves the old file or none, never a truncated one.
"""
from __future__ import annotations

import itertools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_COUNTER = itertools.count()


@contextmanager
def atomic_path(path: os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file to. It is renamed onto ``path`` when the block ends
    without an exception and removed otherwise. Its name is hidden, unique to this process and call, and ends in
    ``suffix`` (give ``.nii.gz`` or ``.png`` to writers that choose the format by the ending). Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_COUNTER)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: os.PathLike, text: str) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: os.PathLike, obj) -> None:
    """``obj`` as JSON (indent 1, sorted keys) as the whole content of ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))
