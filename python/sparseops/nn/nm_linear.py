"""N:M sparse drop-in for ``nn.Linear``: ``NMLinear``, ``sparsify_`` and Wanda calibration scores.

Built only on the public sparseops functions (``nm_compress``, ``nm_linear``, ``NMWeight``).

* ``NMLinear`` stores the weight compressed: the kept values [out, in * n / m] are the
  Parameter (so optimizers, ``.half()``, ``.to()`` and DDP see only them), the packed positions
  a uint8 buffer ``meta``. Training updates the kept values (the dense weight gradient gathered
  at the kept positions); pruned positions do not exist, so they stay zero. It saves and loads
  through ``state_dict`` like a Linear (keys ``values``, ``meta``, ``bias``); a dense Linear
  state dict (key ``weight``) also loads, pruned to the module's pattern by |w|.
* ``sparsify_(model, "2:4", include=..., exclude=..., scores=...)`` replaces matching
  ``nn.Linear`` layers in place.
* ``wanda_scores(model, batches)`` runs calibration batches through the model with forward
  hooks and returns Wanda's |W| * ||x||_2 (per input feature, over every calibration token) for
  each Linear, ready for ``sparsify_(..., scores=...)``.
* Checkpoints: ``nm_layout(model)`` is ``{name: "n:m"}`` of its NMLinear layers; ``sparsify_``
  also writes it to ``model.config.sparseops_nm`` when the model has a Hugging Face style
  config (anything with ``to_dict``), so ``save_pretrained`` stores it in config.json next to
  the compressed tensors (``<name>.values``, ``<name>.meta``). ``apply_nm_layout_(model,
  layout)`` turns the named Linears of a freshly built model into empty NMLinear layers, ready
  for ``load_state_dict``; ``nm_from_pretrained(model_cls, path)`` does the whole reload of a
  ``save_pretrained`` folder (transformers' own ``from_pretrained`` would build dense Linears
  and drop the compressed tensors as unexpected keys).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..ops.nm_sparse import NMWeight, nm_compress, nm_linear

__all__ = [
    "NMLinear",
    "apply_nm_layout_",
    "nm_from_pretrained",
    "nm_layout",
    "parse_pattern",
    "sparsify_",
    "wanda_scores",
]

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}
CONFIG_KEY = "sparseops_nm"  # model.config attribute (and config.json key) holding the layout

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
Scores = Mapping[str, torch.Tensor] | Callable[[str, nn.Module], torch.Tensor | None] | None


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """(n, m) from "n:m" or a tuple (n, m); m in {2, 4, 8, 16}, 1 <= n < m."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern must look like '2:4', got {pattern!r}")
        n, m = int(parts[0]), int(parts[1])
    else:
        try:
            n, m = (int(v) for v in pattern)
        except (TypeError, ValueError):
            raise ValueError(f"pattern must be 'n:m' or a pair (n, m), got {pattern!r}") from None
    if m not in _BITS or not 1 <= n < m:
        raise ValueError(f"pattern {n}:{m} is not supported: need m in (2, 4, 8, 16) and 1 <= n < m")
    return n, m


def _lowest_meta(out: int, kept: int, n: int, m: int, device) -> torch.Tensor:
    """meta (uint8 [out, ceil(kept * b / 8)]) keeping positions 0 .. n-1 of every group."""
    b = _BITS[m]
    j = torch.arange(kept, dtype=torch.int64)
    packed = torch.zeros((kept * b + 7) // 8, dtype=torch.int64)
    packed.index_add_(0, (j * b) // 8, (j % n) << ((j * b) % 8))
    return packed.to(torch.uint8).to(device).expand(out, -1).contiguous()


class NMLinear(nn.Module):
    """y = x @ W^T + b with W [out, in] stored N:M compressed (``sparseops.nm_linear``).

    Parameters ``values`` [out, in // m * n] (the kept values) and ``bias`` [out] or None;
    buffer ``meta`` uint8 [out, ceil(in // m * n * b / 8)] (NM_FORMAT). A fresh module keeps
    the lowest n positions of every group with zero values; use ``from_dense`` or load a
    state dict.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        m: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n, m = parse_pattern((n, m))
        if in_features % m != 0:
            raise ValueError(f"in_features ({in_features}) must be a multiple of m={m} for {n}:{m} sparsity")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features // m * n
        factory = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.zeros(out_features, kept, **factory))
        self.register_buffer("meta", _lowest_meta(out_features, kept, n, m, device))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        n: int,
        m: int,
        *,
        scores: torch.Tensor | None = None,
    ) -> NMLinear:
        """Prune ``linear.weight`` to n:m (the n largest |w|, or largest ``scores`` [out, in],
        per group of m along ``in``; ties to the lower index) and compress it. The bias is
        copied; device and dtype are the Linear's."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(
            linear.in_features, linear.out_features, n, m, bias=linear.bias is not None, device=w.device, dtype=w.dtype
        )
        nmw = nm_compress(w, mod.n, mod.m, prune=True, scores=None if scores is None else scores.detach().to(w.device))
        mod.values = nn.Parameter(nmw.values.contiguous(), requires_grad=linear.weight.requires_grad)
        mod.meta = nmw.meta
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    @property
    def nm_weight(self) -> NMWeight:
        """The compressed weight (shares ``values`` and ``meta``; differentiable in values)."""
        return NMWeight(self.values, self.meta, self.n, self.m, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] (zeros at pruned positions), computed on each access."""
        return self.nm_weight.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_linear(x, self.nm_weight, self.bias)

    def compression(self) -> float:
        """Stored weight bytes (values + meta) over the dense weight's bytes."""
        dense = self.out_features * self.in_features * self.values.element_size()
        return (self.values.numel() * self.values.element_size() + self.meta.numel()) / max(dense, 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.n}:{self.m}, compression={self.compression():.4f}x dense"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        # A dense Linear checkpoint (prefix + "weight"): prune by |w| and compress into place.
        wkey = prefix + "weight"
        if wkey in state_dict and prefix + "values" not in state_dict:
            w = state_dict[wkey]
            if tuple(w.shape) != (self.out_features, self.in_features):
                errs.append(
                    f"size mismatch for {wkey}: copying a dense weight of shape {tuple(w.shape)}, the shape "
                    f"in current model is {(self.out_features, self.in_features)}"
                )
            else:
                nmw = nm_compress(w.detach().to(self.values.device, self.values.dtype), self.n, self.m, prune=True)
                state_dict = dict(state_dict)
                del state_dict[wkey]
                state_dict[prefix + "values"] = nmw.values
                state_dict[prefix + "meta"] = nmw.meta
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)


def _selected(name: str, module: nn.Module, sel: Selector, default: bool) -> bool:
    if sel is None:
        return default
    if callable(sel):
        return bool(sel(name, module))
    globs = [sel] if isinstance(sel, str) else list(sel)
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _score_for(name: str, module: nn.Module, scores: Scores) -> torch.Tensor | None:
    if scores is None:
        return None
    if callable(scores):
        return scores(name, module)
    return scores.get(name)


def sparsify_(
    model: nn.Module,
    pattern: str | tuple[int, int] = "2:4",
    *,
    include: Selector = None,
    exclude: Selector = None,
    scores: Scores = None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` in place by ``NMLinear`` pruned to ``pattern``.

    include / exclude: a glob (``fnmatch`` on the module's qualified name, e.g.
    ``"model.layers.*.mlp.*"``), a list of globs, or a callable ``(name, module) -> bool``;
    a layer is converted when include matches (default: every Linear) and exclude does not.
    scores: ``{name: tensor [out, in]}`` or a callable ``(name, module) -> tensor | None``
    (None: |w|), e.g. from ``wanda_scores``. A selected layer whose in_features is not a
    multiple of m is an error naming it. Returns ``model``; ``model.nm_sparsified`` lists the
    converted names.
    """
    n, m = parse_pattern(pattern)
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and _selected(name, mod, include, True) and not _selected(name, mod, exclude, False):
            if mod.in_features % m != 0:
                raise ValueError(
                    f"sparsify_: layer {name!r} has in_features={mod.in_features}, not a multiple of m={m}; "
                    "exclude it or choose another pattern"
                )
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        s = _score_for(name, lin, scores)
        if s is not None and tuple(s.shape) != tuple(lin.weight.shape):
            raise ValueError(
                f"sparsify_: scores for {name!r} have shape {tuple(s.shape)}, expected {tuple(lin.weight.shape)}"
            )
        setattr(parent, child, NMLinear.from_dense(lin, n, m, scores=s))
    model.nm_sparsified = list(getattr(model, "nm_sparsified", [])) + targets
    _record_layout(model)
    return model


def nm_layout(model: nn.Module) -> dict[str, str]:
    """``{qualified name: "n:m"}`` of every NMLinear in ``model`` (module order)."""
    return {name: f"{mod.n}:{mod.m}" for name, mod in model.named_modules() if isinstance(mod, NMLinear)}


def _record_layout(model: nn.Module) -> None:
    # A Hugging Face config (PretrainedConfig: has to_dict) serialises unknown attributes into
    # config.json, so save_pretrained carries the layout beside the tensors.
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        setattr(cfg, CONFIG_KEY, {"format": "sparseops-nm", "version": 1, "modules": nm_layout(model)})


def apply_nm_layout_(model: nn.Module, layout: Mapping[str, str | tuple[int, int]]) -> nn.Module:
    """Replace the ``nn.Linear`` layers named in ``layout`` ({name: "n:m"}) by empty NMLinear
    layers of that pattern (zero values, same shape, bias, device and dtype), so that a state
    dict saved from a sparsified model loads into ``model``. A name that is not an nn.Linear of
    ``model`` is an error naming it; a name that already is an NMLinear of that pattern is kept.
    Records the layout like ``sparsify_``. Returns ``model``.
    """
    for name, pattern in layout.items():
        n, m = parse_pattern(pattern)
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            lin = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"apply_nm_layout_: the model has no module {name!r}") from None
        if isinstance(lin, NMLinear) and (lin.n, lin.m) == (n, m):
            continue
        if type(lin) is not nn.Linear:
            raise ValueError(f"apply_nm_layout_: {name!r} is a {type(lin).__name__}, not an nn.Linear")
        w = lin.weight
        shell = NMLinear(
            lin.in_features, lin.out_features, n, m, bias=lin.bias is not None, device=w.device, dtype=w.dtype
        )
        shell.values.requires_grad_(w.requires_grad)
        setattr(parent, child, shell)
    _record_layout(model)
    return model


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder (safetensors, single or sharded; else torch .bin)."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(os.path.join(path, shard)))
        return sd
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"nm_from_pretrained: no model.safetensors(.index.json) or pytorch_model.bin in {path!r}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def nm_from_pretrained(
    model_cls: Any,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Reload a ``save_pretrained`` folder of a model sparsified with ``sparsify_``.

    ``model_cls``: a transformers model class (``LlamaForCausalLM``, ...) or an Auto class
    (``AutoModelForCausalLM``). Reads the config (with its ``sparseops_nm`` layout), builds the
    model under ``dtype`` (default: the dtype of the saved tensors, as transformers'
    ``dtype="auto"``; non-persistent buffers such as RoPE frequencies stay as the model makes
    them), turns the layout's Linears into NMLinear (``apply_nm_layout_``), loads every saved
    tensor (values, meta, biases, the dense rest) strictly, ties the tied weights, loads the
    generation config when saved, moves to ``device`` and returns the model in eval mode. A
    missing key other than a tied weight, or an unexpected one, is an error listing them.
    """
    from transformers import AutoConfig, GenerationConfig

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    layout_info = getattr(config, CONFIG_KEY, None)
    if not isinstance(layout_info, Mapping) or "modules" not in layout_info:
        raise ValueError(f"nm_from_pretrained: {path!r} has no {CONFIG_KEY!r} layout in its config (not sparsified?)")
    sd = _read_checkpoint(path)
    if dtype is None:
        floats = [t.dtype for k, t in sd.items() if t.is_floating_point() and k.endswith(".values")]
        dtype = floats[0] if floats else torch.float32
    try:
        from transformers.initialization import no_init_weights  # the weights are overwritten below
    except ImportError:  # transformers 4.x
        no_init_weights = contextlib.nullcontext
    with _default_dtype(dtype), no_init_weights():
        model = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    apply_nm_layout_(model, layout_info["modules"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"nm_from_pretrained: {path!r} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if getattr(model, "generation_config", None) is not None and os.path.exists(
        os.path.join(path, "generation_config.json")
    ):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if device is not None:
        model.to(device)
    return model.eval()


@torch.no_grad()
def wanda_scores(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    include: Selector = None,
    exclude: Selector = None,
) -> dict[str, torch.Tensor]:
    """Wanda scores |W| * ||x||_2 for the ``nn.Linear`` layers of ``model`` (Sun et al. 2023).

    Each batch is run through the model (``model(**b)`` for a dict, ``model(*b)`` for a tuple
    or list, else ``model(b)``) with forward hooks that accumulate, per Linear, the sum of
    squared inputs per input feature over every calibration token (fp32). Returns
    ``{name: |W| * sqrt(sum x^2)}`` (fp32, [out, in], on the weight's device). include /
    exclude select layers as in ``sparsify_``; a selected layer no batch reached is left out.
    """
    sq: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(mod, args, _out):
            x = args[0].detach().reshape(-1, mod.in_features).to(torch.float32)
            acc = x.square().sum(0)
            sq[name] = acc if name not in sq else sq[name] + acc

        return fn

    linears = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and _selected(name, mod, include, True) and not _selected(name, mod, exclude, False):
            linears[name] = mod
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        for b in batches:
            if isinstance(b, Mapping):
                model(**b)
            elif isinstance(b, (tuple, list)):
                model(*b)
            else:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return {
        name: linears[name].weight.detach().abs().to(torch.float32) * sq[name].sqrt()[None, :]
        for name in linears
        if name in sq
    }
