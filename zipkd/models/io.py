"""Load and save models: the embedded default by name, a Hugging Face folder, or a `.gguf` file.

`save_model` writes safetensors + config + tokenizer + the `zipkd.json` manifest atomically. `load_model`
reads any folder zipkd wrote, including heterogeneous ones (per-layer widths, removed blocks) whose
shapes are recorded in the config's `zipkd_layers`; uniform ones also load with plain `from_pretrained`.

Folders in a format that a higher layer defines (a quantized model: `zipkd.quantize`) are marked by a config key
and read by the loader that layer registers in `zipkd.models.formats`; this module knows none of them.

transformers is imported inside the loaders, after `offline_env()`: it reads the hub's offline switches when it
is first imported."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from zipkd.errors import ZipkdError
from zipkd.manifest import build_manifest, write_manifest
from zipkd.models.adapters import ADAPTERS, supported
from zipkd.models.embedded import DEFAULT_MODEL, EMBEDDED, embedded_gguf
from zipkd.models.formats import folder_loader
from zipkd.models.gguf_file import gguf_header
from zipkd.models.surgery import apply_layer_shapes, is_heterogeneous, sync_config
from zipkd.outputs import atomic_dir, check_output, resolve_path
from zipkd.paths import cache_dir, offline_env

DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS_SUFFIX = ".safetensors"
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path  # folder (or .gguf file) it came from
    name: str  # what the user asked for

    @property
    def config(self) -> Any:
        return self.model.config


def torch_dtype(name: str):
    if name not in DTYPES:
        raise ZipkdError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """Map a model argument to a folder or a .gguf file, with one clear error for bad input."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in EMBEDDED:
        return embedded_folder(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        resolve_path(path, "model")  # a symlink loop is named as one
        raise ZipkdError(
            f"model {spec!r} not found: give a model folder, a .gguf file, or one of {', '.join(EMBEDDED)}"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise ZipkdError(f"{path} is a file but not a .gguf model; give a model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise ZipkdError(f"{path} is not a model folder (no config.json)")
    return path


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZipkdError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    mt = cfg.get("model_type")
    if mt not in ADAPTERS:
        raise ZipkdError(f"unsupported architecture {mt!r} in {folder}; zipkd supports: {supported()}")
    return cfg


def tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers of a model folder (no weights read, no torch)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(resolve_model(folder)):
        try:
            with f.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size < 100_000_000:
                    raise ValueError("bad header length")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as exc:
            raise ZipkdError(f"{f} is not a readable safetensors file ({exc})") from None
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ZipkdError(
                f"{folder} holds only pickled weights; zipkd reads safetensors only (convert them first)"
            )
        raise ZipkdError(f"{folder} has no .safetensors weights")
    return files


def read_state_dict(folder: str | os.PathLike) -> dict:
    """Every tensor of a folder's safetensors files (one clear error for a corrupt file)."""
    sd: dict = {}
    for f in _weight_files(Path(folder)):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ZipkdError(f"corrupt weights file {f}: {exc}") from exc
    return sd


def fix_meta_buffers(model: Any) -> None:
    """Non-persistent buffers are not in the checkpoint: rebuild the modules holding them (rotary `inv_freq`)
    or the buffer itself (Gemma's embedding scale, kept beside it as a float)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if isinstance(getattr(module, "scalar_embed_scale", None), float) and module.embed_scale.is_meta:
                module.embed_scale = torch.tensor(module.scalar_embed_scale)
            if not any(b.is_meta for b in module.buffers(recurse=False)):
                continue
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                with torch.device("cpu"):
                    setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=model.config))
            else:
                raise ZipkdError(f"cannot rebuild buffers of {name} ({type(module).__name__})")


def _load_heterogeneous(folder: Path, dtype: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_layer_shapes(model, config.zipkd_layers)
    sd = read_state_dict(folder)
    result = model.load_state_dict(sd, strict=False, assign=True)
    tied = (
        {k for k in result.missing_keys if k.endswith("lm_head.weight")}
        if config.tie_word_embeddings
        else set()
    )
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ZipkdError(
            f"weights in {folder} do not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    fix_meta_buffers(model)
    return model.to(dtype)


def load_model(
    spec: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True
) -> LoadedModel:
    """Load a model for zipkd: the embedded name, a folder, or a .gguf file. Never runs remote code."""
    offline_env()
    dt = torch_dtype(dtype)
    path = resolve_model(spec)
    if path.suffix == ".gguf":
        check_gguf_input(path)
        model, tok = load_gguf(path, dt)
        return LoadedModel(model.to(device), tok, path, str(spec))

    cfg = read_config(path)
    _weight_files(path)

    class _Cfg:  # duck-typed view for is_heterogeneous
        zipkd_layers = cfg.get("zipkd_layers")

    loader = folder_loader(cfg)
    try:
        if loader is not None:  # e.g. saved by `zipkd quantize`: rebuilt by the loader of its format
            model = loader(path, dt, device)
        elif is_heterogeneous(_Cfg):
            model = _load_heterogeneous(path, dt)
        else:
            from transformers import AutoModelForCausalLM

            _read_state_dict_headers(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=False)
    except ZipkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken folders
        raise ZipkdError(f"cannot load model from {path}: {exc}") from exc
    model.eval()
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            raise ZipkdError(f"cannot load the tokenizer from {path}: {exc}") from exc
    return LoadedModel(model.to(device), tok, path, str(spec))


def _read_state_dict_headers(folder: Path) -> None:
    """Check every safetensors file opens (a clear error for a corrupt file before transformers' own)."""
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                list(h.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ZipkdError(f"corrupt weights file {f}: {exc}") from exc


def save_model(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    stage: str,
    inputs: dict[str, Any] | None = None,
    config: Any = None,
    seed: int | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    input_hashes: dict[str, str] | None = None,
    weights_suffix: str = WEIGHTS_SUFFIX,
) -> Path:
    """Write weights (safetensors), config, tokenizer and `zipkd.json` into `out`, atomically. A
    `weights_suffix` other than `.safetensors` renames the weight files (and their index) so that stock
    `from_pretrained` cannot pick them up; `load_model` reads them all the same."""
    out = check_output(out, force, tuple(Path(p) for p in (inputs or {}).values() if p is not None))
    if getattr(model.config, "zipkd_layers", None) is not None or getattr(model.config, "zipkd_base", None):
        sync_config(model)
    manifest = build_manifest(stage, inputs, config, seed, metrics, extra, input_hashes)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if weights_suffix != WEIGHTS_SUFFIX:
            _rename_weights(tmp, weights_suffix)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)
    return out


def _rename_weights(folder: Path, suffix: str) -> None:
    renamed = {}
    for f in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")):
        renamed[f.name] = f.name.removesuffix(WEIGHTS_SUFFIX) + suffix
        f.rename(folder / renamed[f.name])
    for index in folder.glob(f"*{WEIGHTS_SUFFIX}.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renamed.get(v, v) for k, v in data.get("weight_map", {}).items()}
        (folder / index.name.replace(WEIGHTS_SUFFIX, suffix)).write_text(json.dumps(data, indent=2))
        index.unlink()


def embedded_folder(name: str = DEFAULT_MODEL) -> Path:
    """Path of the embedded model's converted safetensors folder (converted on first use)."""
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").is_file():
        convert_gguf(embedded_gguf(name), folder)
    return folder


# llama.cpp architectures of GGUF files whose weights transformers reads (its GGUF loader,
# `transformers.integrations.ggml`) into a family zipkd supports: architecture → model_type. OLMo-2 and
# Granite GGUFs exist, but transformers cannot read them; give zipkd their Hugging Face folders.
GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def check_gguf_input(path: Path) -> dict[str, Any]:
    """Before dequantizing anything: the file parses and holds an architecture zipkd can load (about 0.1 s)."""
    header = gguf_header(path)
    arch = header["fields"].get("general.architecture")
    if arch == "deci":
        raise ZipkdError(
            f"{path} is a per-layer (deci) GGUF that only llama.cpp runs; give zipkd the model folder it was "
            "exported from (its zipkd.manifest metadata names it), or evaluate it with `zipkd eval`"
        )
    if arch not in GGUF_ARCHS:
        raise ZipkdError(
            f"unsupported architecture {arch!r} in {path.name}; zipkd loads GGUF files of "
            f"{', '.join(sorted(GGUF_ARCHS))} (and model folders of {supported()})"
        )
    return header


def load_gguf(path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """Load a GGUF file as a (dequantized) transformers model and tokenizer, saveable afterwards."""
    offline_env()
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
    """A GGUF file rebuilt as a safetensors model folder (transformers refuses to save a GGUF-loaded model)."""
    log.info("converting %s to %s (once)", gguf, folder)
    model, tok = load_gguf(gguf)
    save_model(model, tok, folder, stage="convert", inputs={"gguf": gguf}, force=True)
    return folder
