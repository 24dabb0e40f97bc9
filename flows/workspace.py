"""The content-addressed workspace (IGPT_HOME): where each stage's output lives, and whether it is done.

Every stage writes into `<home>/<kind>/<digest>/`, the digest taken over everything the output depends
on (input digests, configuration). A finished folder carries `_stage.json` (the stage's reference as
JSON, flows/refs.py: digest, MLflow run id, metrics), written last and atomically; so a folder without it is an interrupted
attempt and is redone (training resumes from its own checkpoints there), and a folder with it is reused
by any later run with the same inputs: this marker is the only cache of a stage. This module only names
and checks folders; the work is igpt_core's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

MARKER = "_stage.json"


def digest_of(*parts: Any) -> str:
    """sha256 hex of a JSON rendering of `parts` (dicts sorted, paths as strings)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def home(workspace: str | os.PathLike[str] | None = None) -> Path:
    """The workspace root: `workspace`, else IGPT_HOME, else ./igpt-home (made absolute: workers cd)."""
    root = Path(workspace or os.environ.get("IGPT_HOME") or "igpt-home").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def stage_dir(root: Path, kind: str, digest: str) -> Path:
    """`<root>/<kind>/<digest>`, the one place this stage output with these inputs lives."""
    return root / kind / digest


def read_done(folder: Path) -> dict[str, Any] | None:
    """The stage reference saved in a finished folder, or None when the folder is absent or unfinished."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        return dict(json.loads(marker.read_text()))
    except (OSError, ValueError):
        return None  # a torn marker means an unfinished stage: redo it


def write_done(folder: Path, ref: dict[str, Any]) -> None:
    """Marks `folder` finished with `ref`; written atomically so a crash leaves no half marker."""
    tmp = folder / f".{MARKER}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(ref, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, folder / MARKER)


def prepare(folder: Path, *, keep_partial: bool = False) -> Path:
    """Makes `folder` ready for a fresh attempt: emptied, unless `keep_partial` (a stage that resumes
    from what an interrupted attempt left, like training from its last checkpoint)."""
    if folder.exists() and not keep_partial:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
