"""The stateful part of pruning: calibration data flow through the decoder layers, Hessian hooks, and surgery.

Only the layer being processed moves to the compute device; calibration activations stay there between layers.

1. `build_database`: one pass over the layers. For each layer, float32 Hessians of the inputs of o_proj and
   down_proj (hooks, removed in `finally`) where the method needs them, block influence, then the layer's
   database, built by the method (`zipkd.prune.methods`). An already pruned model (a method that `reprunes`)
   is pruned from its layers' own shapes; its dropped layers stay dropped (empty databases at the end).
2. `apply_choice`: a copy of the model cut to a chosen structure. With the "sequential" refit (zipkd) the
   calibration inputs flow through the *already-pruned* earlier layers: each pruned o_proj/down_proj is
   re-fitted by least squares (the OBS update) on Hessians of its actual inputs. Baselines only slice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zipkd.errors import ZipkdError
from zipkd.models.adapters import adapter_for
from zipkd.models.surgery import (
    LayerShape,
    base_geometry,
    layer_shapes,
    remove_attention,
    remove_mlp,
    slice_attention,
    slice_mlp,
    sync_config,
)
from zipkd.prune import obs
from zipkd.prune.baselines import BlockInfluence
from zipkd.prune.database import LayerDatabase, ModelDatabase, attention_columns, expand_groups
from zipkd.prune.methods import METHODS, LayerStats, PruneMethod, get_method

_LOSS_ROWS = 2048  # tokens per chunk of the loss in the Fisher pass


class _Stop(Exception):
    """Raised by a hook to end a layer forward early (the rest of the layer is not needed)."""


@dataclass
class Activations:
    """Calibration hidden states entering the current layer (one tensor per batch) and the layer kwargs
    (rotary embeddings, mask, positions) the model passes for each batch. A model with mixed attention types
    (Gemma's sliding and global layers) passes each type its own mask and rotary embeddings: `by_type` holds the
    kwargs per type, and `at(layer_type)` makes them the current `kwargs`."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    by_type: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def clone(self) -> Activations:
        return Activations([h.clone() for h in self.hidden], self.kwargs, self.by_type)

    def at(self, layer_type: str | None) -> Activations:
        """Use the layer kwargs of `layer_type` from now on (no-op for a model with one type)."""
        if layer_type in self.by_type:
            self.kwargs = self.by_type[layer_type]
        return self

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def layer_type(config: Any, index: int) -> str | None:
    """The attention type of decoder layer `index` (None for models without `layer_types`)."""
    types = getattr(config, "layer_types", None) or []
    return types[index] if index < len(types) else None


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_inputs(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> Activations:
    """Embed the calibration tokens and record what the model passes to its first decoder layer (and, in a model
    with mixed attention types, the kwargs it passes to the first layer of every other type)."""
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    firsts: dict[str, int] = {}
    for i in range(len(layers)):
        t = layer_type(model.config, i)
        if t is not None and t not in firsts:
            firsts[t] = i
    watched = sorted({0, *firsts.values()}) if len(firsts) > 1 else [0]
    hidden: list[torch.Tensor] = []
    seen: dict[int, list[dict]] = {i: [] for i in watched}

    def hook_for(i: int):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach().to(device))
            kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
            seen[i].append(_to(kw, device))
            if i == watched[-1]:
                raise _Stop

        return hook

    handles = [layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in watched]
    home = model_device(model)
    base = model.get_submodule(ad.layers_path.rsplit(".", 1)[0])
    try:
        with torch.no_grad():  # not inference_mode: the Fisher pass differentiates through these inputs
            for i in range(0, tokens.shape[0], batch_size):
                try:
                    base(input_ids=tokens[i : i + batch_size].to(home), use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    by_type = {t: seen[i] for t, i in firsts.items()} if len(firsts) > 1 else {}
    return Activations(hidden, seen[0], by_type)


def _run(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, use_cache=False, **kw)
    return out[0] if isinstance(out, tuple) else out


class HessianHook:
    """Accumulates H = 2/N Σ x xᵀ (float32) of a Linear's input; optionally stops the forward right after."""

    def __init__(self, module: nn.Linear, stop: bool = False):
        n = module.in_features
        self.H = torch.zeros(n, n, dtype=torch.float32, device=module.weight.device)
        self.count = 0
        self.stop = stop
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _m: Any, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.H.addmm_(x.T, x)
        self.count += x.shape[0]
        if self.stop:
            raise _Stop

    def remove(self) -> None:
        self.handle.remove()

    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise ZipkdError("no calibration tokens reached the layer")
        return self.H.mul_(2.0 / self.count)


def advance(
    layer: nn.Module, acts: Activations, monitor: Callable[[torch.Tensor, torch.Tensor], None] | None = None
) -> None:
    """Replace the activations by the layer's outputs (optionally showing each (input, output) pair)."""
    with torch.inference_mode():
        for i, (h, kw) in enumerate(zip(acts.hidden, acts.kwargs, strict=False)):
            out = _run(layer, h, kw)
            if monitor is not None:
                monitor(h, out)
            acts.hidden[i] = out


def is_pruned(model: nn.Module) -> bool:
    """Does the model keep fewer layers, KV groups or MLP channels than its base?"""
    geo = base_geometry(model.config)
    shapes = layer_shapes(model)
    full = LayerShape(geo.num_kv_heads, geo.intermediate_size)
    return len(shapes) != geo.num_layers or any(s != full for s in shapes)


def check_prunable(model: nn.Module, method: str | PruneMethod) -> None:
    """A pruned model is refused unless the method prunes pruned models further (`reprunes`)."""
    if is_pruned(model):
        check_reprunes(method)


def check_reprunes(method: str | PruneMethod) -> None:
    """Refuse a method that cannot prune an already pruned model, naming those that can."""
    m = get_method(method)
    if not m.reprunes:
        repruners = ", ".join(k.name for k in METHODS.values() if k.reprunes)
        raise ZipkdError(
            f"this model is already pruned and --method {m.name} prunes only an unpruned model; prune its "
            f"base model, or prune further with a method that re-prunes ({repruners})"
        )


def collect_fisher(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device, progress: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (G_attn, G_mlp) = 1/N Σ_t g_t g_tᵀ (float32, on the CPU), g_t the gradient of the summed
    next-token loss w.r.t. the output of the attention / MLP block at token t (equal to the gradient w.r.t. the
    residual stream there). A layer-wise backward: the batch's per-layer inputs are kept, then each layer is
    re-run with autograd from the top down, one layer on the device at a time; no parameter gradients."""
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    home = model_device(model)
    d = model.config.hidden_size
    sums = [[torch.zeros(d, d, dtype=torch.float32, device=device) for _ in range(2)] for _ in layers]
    count = 0
    acts = capture_inputs(model, tokens, batch_size, device)
    head = [model.get_submodule(ad.final_norm), model.get_submodule(ad.lm_head)]
    flags = {p: p.requires_grad for p in model.parameters()}
    task = (
        progress.add_task("Fisher (layer-wise backward)", total=len(acts.hidden))
        if progress is not None
        else None
    )
    handles: list[Any] = []
    try:
        for p in flags:
            p.requires_grad_(False)
        types = [layer_type(model.config, i) for i in range(len(layers))]

        def kw_of(i: int, b: int) -> dict:
            return acts.by_type[types[i]][b] if types[i] in acts.by_type else acts.kwargs[b]

        for b, h in enumerate(acts.hidden):
            ids = tokens[b * batch_size : (b + 1) * batch_size].to(device)
            inputs = []
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    layer.to(device)
                    inputs.append(h)
                    h = _run(layer, h, kw_of(i, b))
                    layer.to(home)
            for m in head:
                m.to(device)
            top = h.detach().requires_grad_(True)
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:]
            flat, flat_labels = top.view(-1, top.shape[-1]), labels.view(-1)
            for r in range(0, flat.shape[0], _LOSS_ROWS):  # chunks: full-vocabulary logits can be large
                with torch.enable_grad():
                    logits = ad.head_logits(model.config, head[1](head[0](flat[r : r + _LOSS_ROWS])).float())
                    loss = torch.nn.functional.cross_entropy(
                        logits, flat_labels[r : r + _LOSS_ROWS], reduction="sum", ignore_index=-100
                    )
                    loss.backward()
                del logits, loss
            for m in head:
                m.to(home)
            grad = top.grad
            del top
            for i in range(len(layers) - 1, -1, -1):
                layer = layers[i]
                layer.to(device)
                handles = [
                    _grad_hook(ad.attention(layer), sums[i][0]),
                    _grad_hook(ad.mlp_block(layer), sums[i][1]),
                ]
                x = inputs[i].detach().requires_grad_(True)
                with torch.enable_grad():
                    out = _run(layer, x, kw_of(i, b))
                    out.backward(grad)
                for hd in handles:
                    hd.remove()
                handles = []
                grad = x.grad
                inputs[i] = None
                layer.to(home)
            count += h.shape[0] * h.shape[1]
            _tick(progress, task)
    finally:
        for hd in handles:
            hd.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if not all(torch.isfinite(G).all() for pair in sums for G in pair):
        raise ZipkdError("the loss gradients overflowed on the calibration data (NaN/inf); no output written")
    return [(a.div_(count).cpu(), m.div_(count).cpu()) for a, m in sums]


def _grad_hook(module: nn.Module, acc: torch.Tensor):
    """On `module`'s forward, hook its output so that the gradient flowing into it adds g gᵀ to `acc`."""

    def grad_fn(g: torch.Tensor) -> None:
        g2 = g.detach().reshape(-1, g.shape[-1]).float()
        acc.addmm_(g2.T, g2)

    def fwd(_m: Any, _inp: Any, out: Any) -> None:
        o = out[0] if isinstance(out, tuple) else out
        if o.requires_grad:
            o.register_hook(grad_fn)

    return module.register_forward_hook(fwd)


def _levels(sizes: list[int], full: int) -> list[int]:
    """The grid's sizes a block of `full` structures can be cut to, `full` itself included (0 stays 0)."""
    return sorted({s for s in sizes if 0 <= s <= full} | {full})


def _empty_layer() -> LayerDatabase:
    """A layer dropped already: both blocks at size 0, nothing left to choose."""
    return LayerDatabase(LayerStats.removed_block("attention"), LayerStats.removed_block("mlp"))


def build_database(
    model: nn.Module,
    acts: Activations | None,
    method: str | PruneMethod,
    attention_sizes: list[int],
    mlp_sizes: list[int],
    damp: float = 0.01,
    device: torch.device | None = None,
    mlp_chunk: int = 1,
    fisher: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    keep_hessians: bool = False,
    progress: Any = None,
) -> ModelDatabase:
    """One pass over the layers building the per-layer database of `method` (a registered name or a
    `PruneMethod`), collecting what it declares it needs. `acts` (layer-0 calibration inputs, consumed) may be
    None for a method that needs no calibration. `fisher`: per layer (G_attn, G_mlp) output-side weights of the
    errors (`collect_fisher`) for methods that use them, else plain squared output errors.

    Each layer's levels are the grid's sizes up to its own shape, so an already pruned model gets a database of
    further cuts; the layers it dropped come last as empty layers, so the database still describes the base's
    number of layers (the latency table's)."""
    m = get_method(method)
    check_prunable(model, m)
    ad = adapter_for(model.config)
    geo = base_geometry(model.config)
    shapes = layer_shapes(model)
    home = model_device(model)
    device = device or home
    layers = ad.layers(model)
    task = progress.add_task(f"{m.name}: database", total=len(layers)) if progress is not None else None
    out: list[LayerDatabase] = []
    hessians = [] if keep_hessians else None
    for index, (layer, shape) in enumerate(zip(layers, shapes, strict=True)):
        a_sizes = _levels(attention_sizes, shape.kv_heads)
        m_sizes = _levels(mlp_sizes, shape.intermediate)
        stats = LayerStats(index, layer, ad, geo, a_sizes, m_sizes, damp, mlp_chunk, current=shape)
        if acts is not None:
            acts.at(layer_type(model.config, index))
        if not m.needs_calibration:
            out.append(m.layer_database(stats))
            _tick(progress, task)
            continue
        if acts is None:
            raise ZipkdError(f"{m.name} needs calibration data")
        layer.to(device)
        bi = BlockInfluence()
        energy = [0.0, 0]
        want = m.needs_hessians or keep_hessians
        hooks = [
            HessianHook(getattr(ad.attention(layer), ad.o)) if want and shape.kv_heads else None,
            HessianHook(getattr(ad.mlp_block(layer), ad.down)) if want and shape.intermediate else None,
        ]

        def monitor(h: torch.Tensor, y: torch.Tensor, bi: BlockInfluence = bi, energy: list = energy) -> None:
            bi.update(h, y)
            energy[0] += float(h.float().square().sum())
            energy[1] += h.shape[0] * h.shape[1]

        try:
            advance(layer, acts, monitor)
            Hs = [hk.value() if hk is not None else None for hk in hooks]
        finally:
            for hk in hooks:
                if hk is not None:
                    hk.remove()
        stats.hessians = (Hs[0], Hs[1]) if want else None
        stats.block_influence = bi.value
        if fisher is not None and m.uses_fisher:
            stats.fisher = (fisher[index][0].to(device), fisher[index][1].to(device))
        ldb = m.layer_database(stats)
        ldb.info = {"block_influence": bi.value, "residual_energy": energy[0] / max(energy[1], 1)}
        out.append(ldb)
        if hessians is not None:
            hessians.append(tuple(H.cpu() if H is not None else None for H in Hs))
        del Hs, stats
        layer.to(home)
        _tick(progress, task)
    out += [_empty_layer() for _ in range(geo.num_layers - len(layers))]
    return ModelDatabase(m.name, out, hessians=hessians)


def _tick(progress: Any, task: Any) -> None:
    if progress is not None:
        progress.advance(task)


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ZipkdError(
            "the weight update produced NaN/inf (degenerate calibration data); no output written"
        )
    lin.weight.data.copy_(w.to(lin.weight.dtype))


def apply_choice(
    model: nn.Module,
    db: ModelDatabase,
    shapes: list,
    acts: Activations | None,
    refit: str,
    damp: float = 0.01,
    device: torch.device | None = None,
    progress: Any = None,
    label: str = "",
) -> nn.Module:
    """A pruned copy of `model` with the given per-layer shapes (from `db`'s kept structures; shapes past the
    model's layers are the empty layers of an already pruned model's database, and must stay empty).

    refit: "sequential" (OBS/least-squares update on inputs through the already-pruned layers; `acts` are
    the layer-0 inputs, consumed), "dense" (update from the database's dense-input Hessians) or "none"."""
    ad = adapter_for(model.config)
    geo = base_geometry(model.config)
    pruned = copy.deepcopy(model)
    home = model_device(pruned)
    device = device or home
    layers = ad.layers(pruned)
    if refit == "sequential" and acts is None:
        raise ValueError("sequential refit needs calibration activations")
    if len(shapes) != len(db.layers) or any(not s.empty for s in shapes[len(layers) :]):
        raise ValueError("the shapes do not fit the database: a dropped layer cannot come back")
    task = progress.add_task(f"{label} surgery", total=len(layers)) if progress is not None else None
    types = [layer_type(pruned.config, i) for i in range(len(layers))]
    for i, (layer, shape) in enumerate(zip(layers, shapes[: len(layers)], strict=True)):
        layer.to(device)
        if refit == "sequential":
            acts.at(types[i])
            _sequential_layer(
                layer, ad, geo, db.layers[i], shape.kv_heads, shape.intermediate, acts, damp, pruned.config
            )
        else:
            _cut_layer(layer, ad, geo, db, i, shape.kv_heads, shape.intermediate, refit, damp)
        layer.to(home)
        _tick(progress, task)
    sync_config(pruned)
    return pruned


def _cut_layer(
    layer: nn.Module,
    ad: Any,
    geo: Any,
    db: ModelDatabase,
    i: int,
    kv: int,
    width: int,
    refit: str,
    damp: float,
) -> None:
    """Slice one layer to (kv, width); with refit="dense", update o_proj/down_proj from the dense Hessians."""
    ldb = db.layers[i]
    cols = attention_columns(geo.group_size, geo.head_dim)
    if refit == "dense" and db.hessians is None:
        raise ValueError("the database kept no Hessians")
    if kv == 0:
        remove_attention(layer, ad)
    elif kv < ldb.attention.full:
        keep = ldb.attention.keep(kv)
        W = getattr(ad.attention(layer), ad.o).weight.detach().float()
        slice_attention(layer, ad, geo.head_dim, geo.group_size, keep.tolist())
        if refit == "dense":
            H = db.hessians[i][0].to(W.device)
            new = obs.refit_columns(W, obs.damp_hessian(H, damp), expand_groups(keep, cols))
            _set_weight(getattr(ad.attention(layer), ad.o), new)
    if width == 0:
        remove_mlp(layer, ad)
    elif width < ldb.mlp.full:
        keep = ldb.mlp.keep(width)
        W = getattr(ad.mlp_block(layer), ad.down).weight.detach().float()
        slice_mlp(layer, ad, keep)
        if refit == "dense":
            H = db.hessians[i][1].to(W.device)
            _set_weight(
                getattr(ad.mlp_block(layer), ad.down), obs.refit_columns(W, obs.damp_hessian(H, damp), keep)
            )


def _capture(run: Callable[[int], Any], n: int, module: nn.Module, outputs: bool) -> list[torch.Tensor]:
    """Inputs (or outputs: the first element of a tuple) of `module` for each of `n` batches; `run(b)` computes
    batch b and is stopped right at the module."""
    seen: list[torch.Tensor] = []

    def pre_hook(_m: Any, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else next(iter(kwargs.values()))).detach())
        raise _Stop

    def hook(_m: Any, _args: tuple, out: Any) -> None:
        seen.append((out[0] if isinstance(out, tuple) else out).detach())
        raise _Stop

    if outputs:
        handle = module.register_forward_hook(hook)
    else:
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in range(n):
                try:
                    run(b)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(seen) != n:
        raise ZipkdError(f"calibration data never reached {type(module).__name__}")
    return seen


def _inputs_of(run: Callable[[int], Any], n: int, module: nn.Module) -> list[torch.Tensor]:
    return _capture(run, n, module, outputs=False)


def _block_outputs(run: Callable[[int], Any], n: int, module: nn.Module) -> list[torch.Tensor]:
    return _capture(run, n, module, outputs=True)


def _refit_kept(W: torch.Tensor, xs: list[torch.Tensor], cols: torch.Tensor, damp: float) -> torch.Tensor:
    """Least-squares weights for the kept input columns `cols` of a linear layer with weight W, on its stored
    inputs `xs`: only H_{:,K} = 2/N Σ x x_Kᵀ and diag H are accumulated (float32), not the full H."""
    HK = torch.zeros(W.shape[1], cols.numel(), dtype=torch.float32, device=W.device)
    diag = torch.zeros((), dtype=torch.float32, device=W.device)
    count = 0
    for x in xs:
        x2 = x.reshape(-1, x.shape[-1]).float()
        HK.addmm_(x2.T, x2.index_select(1, cols))
        diag += x2.square().sum()
        count += x2.shape[0]
    HK.mul_(2.0 / count)
    return obs.refit_from_columns(W, HK, cols, float(diag) * 2.0 / count / W.shape[1], damp)


def _refit_new_inputs(
    W: torch.Tensor, xs: list[torch.Tensor], xps: list[torch.Tensor], cols: torch.Tensor, damp: float
) -> torch.Tensor:
    """Least-squares weights for a layer whose kept inputs changed with the cut (`xps`, e.g. OLMo-2's q/k norms
    over the whole projection renormalise the kept heads): W' x' ≈ W x on the stored dense inputs `xs`."""
    C = torch.zeros(W.shape[1], cols.numel(), dtype=torch.float32, device=W.device)
    P = torch.zeros(cols.numel(), cols.numel(), dtype=torch.float32, device=W.device)
    diag = torch.zeros((), dtype=torch.float32, device=W.device)
    count = 0
    for x, xp in zip(xs, xps, strict=True):
        x2, p2 = x.reshape(-1, x.shape[-1]).float(), xp.reshape(-1, xp.shape[-1]).float()
        C.addmm_(x2.T, p2)
        P.addmm_(p2.T, p2)
        diag += x2.square().sum()
        count += x2.shape[0]
    C.mul_(2.0 / count)
    P.mul_(2.0 / count)
    return obs.refit_from_columns(W, C, cols, float(diag) * 2.0 / count / W.shape[1], damp, gram=P)


def _sequential_layer(
    layer: nn.Module,
    ad: Any,
    geo: Any,
    ldb: LayerDatabase,
    kv: int,
    width: int,
    acts: Activations,
    damp: float,
    config: Any = None,
) -> None:
    """Cut one layer to (kv, width) on the inputs that reach it through the already-pruned layers, re-fit the
    kept columns of o_proj and down_proj by least squares (the OBS update) on those inputs, and advance
    `acts` to the pruned layer's outputs.

    Uses the residual layout every supported family shares (mid = h + s·post₁(attn(pre₁ h)); out = mid +
    s·post₂(mlp(pre₂ mid)), with the adapter's pre-/post-norms, Identity where a family has none, and residual
    scale s) to avoid re-running blocks: attention runs once, the MLP's gate/up once."""
    n = len(acts.hidden)
    attn = ad.attention(layer)

    def run_layer(b: int) -> Any:
        return _run(layer, acts.hidden[b], acts.kwargs[b])

    def add(block: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return ad.residual_add(layer, block, h, out, config)

    # Attention → the residual stream after it (`mids`).
    if kv == 0:
        remove_attention(layer, ad)
        mids = list(acts.hidden)
    elif kv == ldb.attention.full:
        outs = _block_outputs(run_layer, n, attn)
        with torch.inference_mode():
            mids = [add("attention", h, a) for h, a in zip(acts.hidden, outs, strict=True)]
        del outs
    else:
        o = getattr(attn, ad.o)
        zs = _inputs_of(run_layer, n, o)
        keep = ldb.attention.keep(kv)
        cols = expand_groups(keep, attention_columns(geo.group_size, geo.head_dim)).to(zs[0].device)
        W = o.weight.detach().float()
        slice_attention(layer, ad, geo.head_dim, geo.group_size, keep.tolist())
        o_new = getattr(ad.attention(layer), ad.o)
        if ad.qk_norm == "projection":  # the kept heads' values change with the cut: refit on the new ones
            zps = _inputs_of(run_layer, n, o_new)
            _set_weight(o_new, _refit_new_inputs(W, zs, zps, cols, damp))
        else:
            zps = [z.index_select(-1, cols) for z in zs]
            _set_weight(o_new, _refit_kept(W, zs, cols, damp))
        with torch.inference_mode():
            mids = [add("attention", h, o_new(z)) for h, z in zip(acts.hidden, zps, strict=True)]
        del zs, zps
    # MLP → the layer's outputs (surgery outside inference mode: new parameters must be normal tensors).
    mlp = ad.mlp_block(layer)
    if width == 0:
        remove_mlp(layer, ad)
        outs = mids
    elif width == ldb.mlp.full:
        with torch.inference_mode():
            outs = [add("mlp", m, mlp(ad.block_input(layer, "mlp", m))) for m in mids]
    else:
        down = getattr(mlp, ad.down)
        xs = _inputs_of(lambda b: mlp(ad.block_input(layer, "mlp", mids[b])), n, down)
        keep = ldb.mlp.keep(width)
        k = keep.to(xs[0].device)
        W = down.weight.detach().float()
        slice_mlp(layer, ad, keep)
        d_new = getattr(ad.mlp_block(layer), ad.down)
        _set_weight(d_new, _refit_kept(W, xs, k, damp))
        with torch.inference_mode():
            outs = [add("mlp", m, d_new(x.index_select(-1, k))) for m, x in zip(mids, xs, strict=True)]
        del xs
    acts.hidden = outs
