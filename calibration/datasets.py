"""Named datasets: hub location plus the local file (and its sha256) used offline.

Local files are looked up under ``$BINARIZE_DATA_DIR``, else ``../shared/data`` next to
the checkout; a split with no local file comes from the hub (``datasets``, streaming).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SplitDef:
    hub_split: str
    local: str | None = None  # path relative to the data dir
    sha256: str | None = None
    hub_data_files: str | None = None


@dataclass(frozen=True)
class DatasetDef:
    name: str
    hub_id: str
    hub_config: str | None
    text_field: str
    local_format: str  # wikitext-raw | lines | jsonl
    splits: dict[str, SplitDef] = field(default_factory=dict)
    default_split: str = "train"


DATASETS: dict[str, DatasetDef] = {
    "wikitext2": DatasetDef(
        "wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "text", "wikitext-raw",
        {
            "train": SplitDef("train"),
            "validation": SplitDef("validation"),
            "test": SplitDef("test", "wikitext2/wiki.test.raw",
                             "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
        },
    ),
    "ptb": DatasetDef(
        "ptb", "ptb-text-only/ptb_text_only", "penn_treebank", "sentence", "lines",
        {
            "train": SplitDef("train", "ptb/ptb.train.txt",
                              "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            "validation": SplitDef("validation", "ptb/ptb.valid.txt",
                                   "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            "test": SplitDef("test", "ptb/ptb.test.txt",
                             "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
        },
    ),
    "c4": DatasetDef(
        "c4", "allenai/c4", "en", "text", "jsonl",
        {
            "train": SplitDef("train", hub_data_files="en/c4-train.00000-of-01024.json.gz"),
            "validation": SplitDef("validation", "c4/c4_valid_part_of_0.1025docs.jsonl.gz",
                                   "038ba4d1ffe134a93e0504100ab873c5ff5b9d8af28866740ddf822bf3d5b6ec",
                                   hub_data_files="en/c4-validation.00000-of-00008.json.gz"),
        },
    ),
}


def data_dir() -> Path | None:
    """$BINARIZE_DATA_DIR, else ../shared/data beside the checkout, else None (hub only)."""
    env = os.environ.get("BINARIZE_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return None


def local_file(split: SplitDef) -> Path | None:
    root = data_dir()
    if split.local is None or root is None:
        return None
    path = root / split.local
    return path if path.is_file() else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
