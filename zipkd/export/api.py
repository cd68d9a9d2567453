"""Python API: `export(lm, ExportConfig(quantization="q8_0"), "model.gguf")` writes a GGUF that llama.cpp
runs. Formats are a registry (`FORMATS`); GGUF is the one there is today.

    from zipkd import ExportConfig, export_model, load_model
    export_model(load_model("out/pruned/2x"), ExportConfig(quantization="q8_0"), "pruned-2x-q8_0.gguf")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.export.gguf import _hf_ids, choose_arch, hparams, plan_layers, probe_texts, write_f32
from zipkd.manifest import build_manifest
from zipkd.models.adapters import adapter_for
from zipkd.models.io import read_config, resolve_model
from zipkd.models.surgery import base_geometry, layer_shapes
from zipkd.outputs import check_output, scratch_beside
from zipkd.runtimes.llamacpp import gguf_metadata, llama_cpp_module, open_model, parse_ftype, quantize_gguf

MANIFEST_KEY = "zipkd.manifest"  # the export's manifest, as a JSON string inside the GGUF


@dataclass
class ExportConfig:
    """What `export` writes. Validated on construction."""

    format: str = "gguf"  # gguf
    quantization: str = "f32"  # f32 | f16 | bf16 | q8_0 | q4_k_m | … (zipkd.runtimes.llamacpp.FTYPES)
    threads: int | None = None  # llama.cpp quantizer threads (None: all cores)
    check: bool = True  # after writing, check llama.cpp loads the file and tokenizes like Hugging Face

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ZipkdError(f"unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}")
        self.quantization = parse_ftype(self.quantization)
        if self.threads is not None and self.threads < 1:
            raise ZipkdError("threads must be at least 1")


@dataclass
class ExportResult:
    path: Path
    arch: str
    quantization: str
    size_bytes: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def check_file_output(out: str | os.PathLike, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an existing output file without force, a folder in its place, an output inside an input, and an
    unwritable folder — before any work."""
    return check_output(out, force, inputs, kind="file")


def export_gguf(lm: Any, config: ExportConfig, out: str | os.PathLike, force: bool = False) -> ExportResult:
    """Write `lm` (a LoadedModel) as a GGUF file at `out`, atomically: f32 with the `gguf` package, then
    llama.cpp's quantizer for any other type; the manifest goes into the file's metadata."""
    src = getattr(lm, "path", None)
    out = check_file_output(out, force, (Path(src),) if src else ())
    llama_cpp_module()  # fail before any work when llama.cpp is missing
    if getattr(lm, "tokenizer", None) is None:
        raise ZipkdError("GGUF export needs the model's tokenizer (llama.cpp carries it in the file)")
    model = lm.model
    geo = base_geometry(model.config)
    layers = plan_layers(layer_shapes(model), geo.group_size, geo.num_heads)
    choose_arch(adapter_for(model.config).family, layers)  # no GGUF mapping: refused before any work
    hparams(model.config)
    manifest = build_manifest(
        "export", {"model": src}, config, None, {"gguf_layers": len(layers)}, {"export": {"format": "gguf"}}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_beside(out) as tmpdir:
        tok_dir = tmpdir / "tokenizer"
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tok_dir)
        f32 = tmpdir / "model-f32.gguf"
        arch = write_f32(
            model,
            tok_dir if lm.tokenizer is not None else None,
            lm.tokenizer,
            f32,
            {MANIFEST_KEY: json.dumps(manifest, sort_keys=True, default=str)},
        )
        final = f32
        if config.quantization != "f32":
            final = quantize_gguf(f32, tmpdir / "model.gguf", config.quantization, config.threads)
        if config.check:
            check_export(final, lm.tokenizer)
        os.replace(final, out)
    return ExportResult(out, arch, config.quantization, out.stat().st_size, [asdict(lay) for lay in layers])


def precheck(spec: str | os.PathLike) -> None:
    """From a model folder's config.json alone (nothing loaded): refuse an architecture or layout that has no
    GGUF mapping, in a second."""
    path = resolve_model(spec)
    if path.suffix == ".gguf":
        return
    cfg = read_config(path)
    family = cfg.get("model_type")
    shapes = cfg.get("zipkd_layers") or [{"kv_heads": 1, "intermediate": 1}]
    kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 1
    group = max(1, (cfg.get("num_attention_heads") or kv) // kv)
    choose_arch(family, plan_layers(shapes, group, group * kv))


def check_export(path: Path, tokenizer: Any) -> None:
    """llama.cpp opens the written file and tokenizes the probe texts exactly as the Hugging Face tokenizer."""
    with open_model(path, n_ctx=64) as em:
        if tokenizer is None:
            return
        for text in probe_texts()[:12]:
            if em.tokenize(text) != _hf_ids(tokenizer, text):
                raise ZipkdError(
                    f"the GGUF written for {path.name} tokenizes differently from the model's tokenizer"
                )


def read_export_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    meta = gguf_metadata(path, keys=(MANIFEST_KEY,))
    try:
        return json.loads(meta[MANIFEST_KEY]) if MANIFEST_KEY in meta else None
    except json.JSONDecodeError:
        return None


FORMATS: dict[str, Callable[..., ExportResult]] = {"gguf": export_gguf}


def export(lm: Any, config: ExportConfig, out: str | os.PathLike, force: bool = False) -> ExportResult:
    """Export `lm` in `config.format` to `out` (a file)."""
    return FORMATS[config.format](lm, config, out, force)
