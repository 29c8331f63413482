"""Training views: a model's module tree made trainable without touching the model.

A *view* is a shallow copy of a module tree (module objects copied; their parameter and buffer
dicts, code and configuration shared) in which each weight layer is replaced by a
``TrainingLayer``. The shared modules, their weights and their ``forward`` methods are never
changed, so the model other branches of the graph use stays exactly as it is.

A TrainingLayer computes what the layer it stands for computes, ``op(x, W, b)``, where:

- ``W, b`` come from the host's ``cast(layer, dtype, device)``. For ComfyUI that is its own
  cast step, so what the model carries (a LoRA applied before training, weights that ComfyUI
  streams or offloads) is in ``W`` exactly as in inference.
- A frozen ``W`` is never saved for backward: backward asks ``cast`` for it again. Loaded
  weights are inference tensors (autograd refuses to save them), may be views into buffers the
  host reuses for the next layer, and kept until backward they would cost a copy of the model.
- A LoRA adapter (``adapters.LoraPair``) adds its term to the output ("bypass"): the layer's
  weight is never formed into ``W + ΔW``.
- For full fine-tuning the layer has weights of its own (a trainable copy, float32 or
  bfloat16), cast to the compute dtype in forward and cast again in backward.

Everything runs in ``compute_dtype`` (the input is cast to it, as ComfyUI's cast layers cast
weights to their input's dtype).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .adapters import ConvGeometry, LoraPair

# (layer, dtype, device) -> (weight, bias) as the layer's own forward would use them.
Cast = Callable[[torch.nn.Module, torch.dtype, torch.device], "tuple[torch.Tensor, torch.Tensor | None]"]
# (layer, weight, bias): the host may reuse what ``cast`` handed out once this is called.
Release = Callable[[torch.nn.Module, torch.Tensor, "torch.Tensor | None"], None]


def _keep(layer: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    pass


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


_RMS_NORM = getattr(torch.nn, "RMSNorm", None)


def layer_kind(module: torch.nn.Module) -> str | None:
    """What a TrainingLayer can stand in for: 'linear', 'conv', 'group_norm', 'layer_norm', 'rms_norm', 'embedding'."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, torch.nn.GroupNorm):
        return "group_norm"
    if isinstance(module, torch.nn.LayerNorm):
        return "layer_norm"
    if _RMS_NORM is not None and isinstance(module, _RMS_NORM):
        return "rms_norm"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


class TrainingLayer(torch.nn.Module):
    """One weight layer of a training view (see the module docstring).

    ``source``: the shared layer (never modified). ``adapter``: a LoRA pair whose term is added.
    ``own_dtype``: give the layer trainable weights of its own, copied from the source's
    effective weights in that dtype (full fine-tuning).
    """

    def __init__(
        self,
        source: torch.nn.Module,
        kind: str,
        cast: Cast,
        compute_dtype: torch.dtype,
        *,
        adapter: LoraPair | None = None,
        own_dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        release: Release = _keep,
    ):
        super().__init__()
        # Not registered as a submodule: the view's parameters are what trains, nothing shared.
        self.__dict__["source"] = source
        self.kind = kind
        self.cast = cast
        self.release = release
        self.compute_dtype = compute_dtype
        self.adapter = adapter
        if adapter is not None and kind not in ("linear", "conv"):
            raise ValueError(f"LoRA adapters attach to linear and convolution layers, not to a {kind} layer")
        self.own = own_dtype is not None
        if self.own:
            device = device if device is not None else source.weight.device
            weight, bias = cast(source, torch.float32, device)
            # Registered directly: hasattr(self, "weight") already answers with the source's.
            self._parameters["weight"] = torch.nn.Parameter(weight.detach().to(own_dtype, copy=True))
            self._parameters["bias"] = None if bias is None else torch.nn.Parameter(bias.detach().to(own_dtype, copy=True))
            release(source, weight, bias)

    def __getattr__(self, name: str) -> Any:
        # Code that reads a layer's attributes (its weight's device, in_features, ...) reads
        # the source layer's, unless the layer has its own (full fine-tuning's weights).
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("source")
            if source is None:
                raise
            return getattr(source, name)

    def extra_repr(self) -> str:
        mode = "own weights" if self.own else ("LoRA" if self.adapter is not None else "frozen")
        return f"{self.kind}, {mode}, compute {self.compute_dtype}"

    # ------------------------------------------------------------------ weights

    def frozen_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared layer's weights for one use; ``release_weights`` them once it is over."""
        return self.cast(self.source, dtype, device)

    def release_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.release(self.source, weight, bias)

    def geometry(self) -> ConvGeometry | None:
        s = self.source
        return (
            ConvGeometry(tuple(s.stride), s.padding if isinstance(s.padding, str) else tuple(s.padding), tuple(s.dilation), s.groups)
            if self.kind == "conv"
            else None
        )

    # ------------------------------------------------------------------ the operation

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.source
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv":
            return s._conv_forward(x, weight, bias)
        if self.kind == "group_norm":
            return F.group_norm(x, s.num_groups, weight, bias, s.eps)
        if self.kind == "layer_norm":
            return F.layer_norm(x, s.normalized_shape, weight, bias, s.eps)
        if self.kind == "rms_norm":
            return F.rms_norm(x, s.normalized_shape, weight, s.eps)
        if self.kind == "embedding":
            return F.embedding(x, weight, s.padding_idx, s.max_norm, s.norm_type, s.scale_grad_by_freq, s.sparse)
        raise AssertionError(self.kind)

    def _plain_conv(self) -> bool:
        s = self.source
        return self.kind == "conv" and s.padding_mode == "zeros" and not isinstance(s.padding, str)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """d(loss)/dx of ``op`` (linear in x for linear and conv layers) given d(loss)/dy."""
        if self.kind == "linear":
            return grad.matmul(weight.to(grad.dtype))
        if self._plain_conv():
            s = self.source
            return _CONV_INPUT_GRAD[weight.dim() - 2](input_shape, weight.to(grad.dtype), grad, s.stride, s.padding, s.dilation, s.groups)
        with torch.enable_grad():  # any other padding: the op's own backward, at x = 0 (it is linear in x)
            x = torch.zeros(input_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (dx,) = torch.autograd.grad(self.op(x, weight.to(grad.dtype), None), x, grad)
        return dx

    def weight_grads(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dW, db) of ``op`` given d(loss)/dy and the input."""
        if self.kind == "linear":
            flat_grad = grad.reshape(-1, grad.shape[-1])
            d_weight = flat_grad.t().matmul(x.reshape(-1, x.shape[-1]))
            return d_weight, flat_grad.sum(0) if with_bias else None
        if self._plain_conv():
            s = self.source
            d_weight = _CONV_WEIGHT_GRAD[weight.dim() - 2](x, weight.shape, grad, s.stride, s.padding, s.dilation, s.groups)
            return d_weight, grad.sum(dim=[0, *range(2, grad.dim())]) if with_bias else None
        with torch.enable_grad():
            w = weight.detach().requires_grad_(True)
            b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device, requires_grad=True) if with_bias else None
            inputs = [w] if b is None else [w, b]
            grads = torch.autograd.grad(self.op(x.detach(), w, b), inputs, grad)
        return grads[0], grads[1] if with_bias else None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "embedding":
            return self._embedding(x, kwargs.get("out_dtype"))
        dtype = self.compute_dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.kind not in ("linear", "conv"):
            # Norms: tiny weights, so a copy is what autograd keeps (never a shared tensor).
            if self.own:
                weight = self.weight.to(dtype)
                bias = None if self.bias is None else self.bias.to(dtype)
            else:
                shared, shared_bias = self.frozen_weights(dtype, x.device)
                weight, bias = _private(shared), _private(shared_bias)
                self.release_weights(shared, shared_bias)
            return self.op(x, weight, bias)
        if self.own:
            if self.weight.dtype == dtype:
                y = self.op(x, self.weight, self.bias)
            else:
                y = _CastAffine.apply(x, self.weight, self.bias, self)
        else:
            y = _FrozenAffine.apply(x, self)
        if self.adapter is not None:
            y = y + self.adapter.bypass(x, self.geometry())
        return y

    def _embedding(self, ids: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
        if self.own:
            weight = self.weight if out_dtype is None else self.weight.to(out_dtype)
        else:
            shared, shared_bias = self.frozen_weights(out_dtype or self.source.weight.dtype, ids.device)
            try:  # only ids go in: nothing to save, nothing to differentiate
                out = self.op(ids, shared.detach(), None)
            finally:
                self.release_weights(shared, shared_bias)
            return out if out_dtype is None else out.to(out_dtype)
        out = self.op(ids, weight, None)
        return out if out_dtype is None else out.to(out_dtype)


def _private(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # Cut from the shared weight's graph (ComfyUI's loaded weights are Parameters that require
    # grad: without the cut, backward would leave a gradient on the shared model).
    return None if tensor is None else tensor.detach().clone()


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Inside these functions the dtype is chosen explicitly; autocast would cast again (a copy)
    # and leave backward's grad in another dtype than its weight.
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()


def _not_a_view(output: torch.Tensor) -> torch.Tensor:
    # A linear layer on a non-contiguous input (Flux's patchified image) can return a view of
    # its result; autograd forbids modifying a custom Function's view output in place, and Flux
    # adds its residuals in place (`img += ...`). Detached, it is a plain tensor on the same
    # memory (nothing else refers to the result), so no copy is made.
    return output.detach() if output._is_view() else output


class _FrozenAffine(torch.autograd.Function):
    """y = op(x, W, b) for a frozen W, which is not kept: backward casts it again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: TrainingLayer) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_shape = x.shape
        with _no_autocast(x.device):
            weight, bias = layer.frozen_weights(x.dtype, x.device)
            try:
                return _not_a_view(layer.op(x, weight, bias))
            finally:
                layer.release_weights(weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        with _no_autocast(grad.device):
            weight, bias = ctx.layer.frozen_weights(grad.dtype, grad.device)
            try:
                return ctx.layer.input_grad(grad, weight, ctx.input_shape), None
            finally:
                ctx.layer.release_weights(weight, bias)


class _CastAffine(torch.autograd.Function):
    """y = op(x, W.to(dtype), b.to(dtype)) for a trainable W stored in another dtype; the cast
    copy is not kept between forward and backward (backward casts again)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: TrainingLayer) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias)
        with _no_autocast(x.device):
            return _not_a_view(layer.op(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        layer = ctx.layer
        with _no_autocast(grad.device):
            cast = weight.to(grad.dtype)
            d_x = layer.input_grad(grad, cast, x.shape) if ctx.needs_input_grad[0] else None
            d_weight, d_bias = layer.weight_grads(grad, x.to(grad.dtype), cast, ctx.has_bias)
        return d_x, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(bias.dtype), None


# --------------------------------------------------------------------------- views


def training_view(
    root: torch.nn.Module,
    cast: Cast,
    compute_dtype: torch.dtype,
    *,
    is_layer: Callable[[torch.nn.Module], bool],
    adapters: Mapping[str, LoraPair] | None = None,
    own_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    release: Release = _keep,
) -> torch.nn.Module:
    """A view of ``root`` whose layers (``is_layer``) are TrainingLayers (``cast`` hands out a
    shared layer's weights for one use, ``release`` takes them back).

    ``adapters``: {module path below root: LoraPair}. ``own_dtype``: every supported layer
    gets trainable weights of its own in that dtype, on ``device`` (full fine-tuning); any
    other parameter of the tree is copied as a trainable float32 parameter too.
    """
    adapters = dict(adapters or {})
    memo: dict[int, torch.nn.Module] = {}
    placed: set[str] = set()
    own: list[torch.nn.Parameter] = []

    def build(module: torch.nn.Module, path: str) -> torch.nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        kind = layer_kind(module) if is_layer(module) else None
        if kind is not None and getattr(module, "weight", None) is not None:
            adapter = adapters.get(path)
            if adapter is not None:
                placed.add(path)
            new: torch.nn.Module = TrainingLayer(
                module, kind, cast, compute_dtype, adapter=adapter, own_dtype=own_dtype, device=device, release=release
            )
            own.extend(p for p in new._parameters.values() if p is not None)
        elif not module._modules and own_dtype is None and not any(p is not None for p in module._parameters.values()):
            new = module  # a leaf that is no layer and holds no weight (activations, dropout): shared
        else:
            new = copy.copy(module)
            new._modules = {n: None if c is None else build(c, f"{path}.{n}" if path else n) for n, c in module._modules.items()}
            if own_dtype is not None and module._parameters:
                new._parameters = {
                    n: None if p is None else torch.nn.Parameter(p.detach().to(device or p.device, torch.float32, copy=True))
                    for n, p in module._parameters.items()
                }
                own.extend(p for p in new._parameters.values() if p is not None)
            elif module._parameters:
                # Weights held outside ComfyUI's cast layers (Flux's QK-norm scale on v0.3.64, SD3.5's
                # RMSNorm, a MoE gate) are loaded as inference tensors, which autograd cannot save:
                # the view computes with frozen private copies (small), the shared ones stay as they are.
                new._parameters = {
                    n: None if p is None else torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    for n, p in module._parameters.items()
                }
        memo[id(module)] = new
        return new

    view = build(root, "")
    missing = set(adapters) - placed
    if missing:
        raise ValueError(f"{len(missing)} adapter(s) found no layer to attach to, e.g. '{sorted(missing)[0]}'")
    # What trains in the view itself (its module dicts share the source's other parameters).
    view.own_parameters = own
    return view


def training_layers(view: torch.nn.Module) -> Iterator[tuple[str, TrainingLayer]]:
    for name, module in view.named_modules():
        if isinstance(module, TrainingLayer):
            yield name, module


# --------------------------------------------------------------------------- gradient checkpointing

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Snapshot option dicts: ComfyUI's blocks write into transformer_options as the
        # forward proceeds, and the recomputation in backward must see them as they were.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _trains(module: torch.nn.Module) -> bool:
    return any(isinstance(m, TrainingLayer) for m in module.modules()) or next(module.parameters(), None) is not None


def _checkpoint_tree(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, TrainingLayer) or not _trains(module):
        return module  # one layer (or nothing that trains): shared as it is
    if isinstance(module, _CONTAINERS):
        new = copy.copy(module)
        new._modules = {n: None if c is None else _checkpoint_tree(c) for n, c in module._modules.items()}
        return new
    new = copy.copy(module)
    new.forward = _checkpointed(module.forward)
    return new


def checkpointed_view(root: torch.nn.Module) -> torch.nn.Module:
    """``root`` whose top-level blocks recompute their activations in backward.

    The blocks (the highest modules below ``root`` and its lists, e.g. each ResBlock and
    SpatialTransformer) are shallow copies whose ``forward`` runs under
    ``torch.utils.checkpoint``; layers and weights are the originals, untouched.
    """
    view = copy.copy(root)
    view._modules = {n: None if c is None else _checkpoint_tree(c) for n, c in root._modules.items()}
    return view


# --------------------------------------------------------------------------- in-place forwards


@contextlib.contextmanager
def saved_activation_copies() -> Iterator[None]:
    """Autograd keeps copies of the activations it saves (those that depend on what trains).

    ComfyUI's CLIP adds residuals in place (``x += attn(x)``), which overwrites tensors
    autograd saved, and backward comes back silently wrong; with copies it is exact
    (checked against finite differences in the tests).
    """

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if tensor.requires_grad else tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield
