"""The open_clip-format model configs shipped inside clipret (``clipret/configs/*.json``).

They resolve by bare name, with or without ``.json`` (``--model tiny-vit``, ``--model
demo-rn.json``), from any directory, so the commands the demo prints run anywhere. A file of
that name in the working directory, or an open_clip model of that name, comes first.
Torch-free: the CLI's help text lists them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "bundled_names", "bundled_config"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def bundled_names() -> list[str]:
    """The bundled configs' names, without ``.json``, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def bundled_config(model: str) -> Path | None:
    """The bundled config that ``model`` names (``tiny-vit`` or ``tiny-vit.json``), else None."""
    if "/" in model or "\\" in model:
        return None
    name = model.removesuffix(".json")
    path = CONFIG_DIR / f"{name}.json"
    return path if name and path.is_file() else None
