"""Where the demo zoo lives and how its parts are named.

The zoo is a folder (``zoo/`` at the repository root, or ``$COSINE_ZOO``) holding::

    manifest.json          what was built from what (corpus hashes, settings, loss curves, measurements)
    MODEL_CARD.md          the model card
    target/                the target model (Hugging Face format, with the tokenizer)
    drafters/<domain>/     one drafter per domain (Hugging Face format, with the tokenizer)
    heldout/<domain>.txt   held-out text per domain (never trained on)
    prompts.json           held-out prompts per domain for tests, demos and benchmarks
"""

from __future__ import annotations

import json
import os
import pathlib

from cosine.errors import ZooNotFoundError

ENV_VAR = "COSINE_ZOO"
_REPO_ZOO = pathlib.Path(__file__).resolve().parents[2] / "zoo"


def zoo_dir(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The zoo folder: ``path`` if given, else ``$COSINE_ZOO``, else ``zoo/`` beside the package."""
    return pathlib.Path(path or os.environ.get(ENV_VAR) or _REPO_ZOO)


def target_dir(zoo: pathlib.Path | None = None) -> pathlib.Path:
    return (zoo or zoo_dir()) / "target"


def drafter_dir(domain: str, zoo: pathlib.Path | None = None) -> pathlib.Path:
    return (zoo or zoo_dir()) / "drafters" / domain


def manifest_path(zoo: pathlib.Path | None = None) -> pathlib.Path:
    return (zoo or zoo_dir()) / "manifest.json"


def load_manifest(zoo: pathlib.Path | None = None) -> dict:
    path = manifest_path(zoo)
    if not path.exists():
        raise ZooNotFoundError(f"no zoo at {path.parent}: run `cosine zoo build` or set ${ENV_VAR}")
    return json.loads(path.read_text())


def drafter_domains(zoo: pathlib.Path | None = None) -> list[str]:
    return sorted(load_manifest(zoo)["drafters"])


def load_prompts(zoo: pathlib.Path | None = None) -> dict[str, list[str]]:
    """Held-out prompts per domain."""
    path = (zoo or zoo_dir()) / "prompts.json"
    if not path.exists():
        raise ZooNotFoundError(f"no prompts at {path}: run `cosine zoo build`")
    return json.loads(path.read_text())


def heldout_text(domain: str, zoo: pathlib.Path | None = None) -> str:
    return ((zoo or zoo_dir()) / "heldout" / f"{domain}.txt").read_text(encoding="utf-8")
