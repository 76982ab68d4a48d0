"""LoRA on ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: the layers the ``lora``
method (:mod:`lightning_lora.methods.lora`) builds for targets that are not linear.

Embedding, table ``E`` of shape (n, d) (``num_embeddings``, ``embedding_dim``)::

    y = E[x] + s · (Aᵀ[x]) Bᵀ          A: (r, n) = 0,  B: (d, r) ~ N(0, 1)
    ΔE = s · (B A)ᵀ, shape (n, d)

The roles of A and B swap against a linear layer (METHODS.md §1, "Embedding layers swap roles",
loralib's ``Embedding`` and PEFT's): A starts at zero, so the output equals the base at init, and
B is Gaussian (``init`` "kaiming" and "gaussian" both give this, as in PEFT). The lookup of A takes
the base's ``padding_idx`` (that token's column of A gets no gradient, so its output stays the
base's) and ``scale_grad_by_freq``; a base with ``max_norm`` is refused (it renormalises its own
table in place at every lookup, so no update could be separated from it). The adapter's gradient
is dense even for a ``sparse=True`` base (AdamW takes no sparse gradients). A base with an
``embed_scale`` (transformers' scaled word embeddings, Gemma) multiplies the adapter term by it, as
its forward multiplies the looked-up rows, so that merged and unmerged outputs agree (PEFT does the
same).

Convolution, kernel ``W`` of shape (C_out, C_in, *k)::

    y = conv(x, W) + s · conv₁ₓ₁(conv(dropout(x), A), B)      A: (r, C_in, *k),  B: (C_out, r, 1, ...)
    ΔW[o, i, ...] = s · Σ_j B[o, j] · A[j, i, ...]

A convolves with the base's own geometry (stride, padding, dilation, padding mode: the base's
``_conv_forward``) and B is a 1×1 convolution, so the sum of the two is one convolution with
``ΔW``: merging is exact. A is Kaiming-uniform (or N(0, 1/r²) with ``init="gaussian"``) and B = 0,
as for a linear layer.

A grouped convolution (``groups = g > 1``, depthwise ones included) holds one kernel block per group,
(C_out/g, C_in/g, *k) each. Its update is one rank-r/g LoRA per group, so that ``ΔW`` has the base
kernel's grouped shape and merging stays exact: A (r, C_in/g, *k) and B (C_out, r/g, 1, ...) run as
grouped convolutions with the base's g (``ΔW`` of group G is ``s · B_G A_G``); r must be a multiple
of g. PEFT (0.21.2) has another form for grouped bases, which it cannot merge (an ungrouped A
over every input channel, a grouped B): its directories for such bases do not load here (a shape
mismatch, named), and adapters of grouped bases are saved in this library's own format.

Both layers save under PEFT's names and shapes (``lora_embedding_A`` / ``lora_embedding_B``;
``lora_A.weight`` / ``lora_B.weight`` holding the convolution kernels; DoRA's
``lora_magnitude_vector``), so a directory holding them
loads in ``peft.PeftModel.from_pretrained`` with the same outputs, and back. One difference in
PEFT's own code (peft 0.21.2): its ``lora_A`` convolution takes the base's stride and padding but
not its dilation or padding mode, so on a dilated base PEFT's unmerged forward fails (a shape
mismatch) and on a base with ``padding_mode="reflect"`` its unmerged output is not its merged one
(5.7 apart on a random 3x3 Conv2d, against 2e-6 with zero padding: ``benchmarks/peft_merge_checks.py``); this library follows the merged
form (the update ``ΔW`` both share), so its directories for such bases load in PEFT and merge there
to the same model.

Transposed convolution (``nn.ConvTranspose1d/2d/3d``), kernel ``W`` of shape (C_in, C_out/g, *k),
the input channel first (PEFT has no LoRA for it)::

    y = convT(x, W) + s · convT(conv₁ₓ₁(dropout(x), A), B)     A: (r, C_in/g, 1, ...),  B: (r, C_out/g, *k)
    ΔW[i, o, ...] = s · Σ_j A[j, i] · B[j, o, ...]   (j within i's group)

The kernel sits in B, which runs with the base's geometry (stride, padding, output padding for the
requested ``output_size``, dilation, groups), so the sum is one transposed convolution with ``ΔW``
and merging is exact; ΔW, seen as (C_in) x (C_out·k) per group, has rank r/g. A is Kaiming-uniform
(or N(0, 1/r²)) and B = 0, so the output is the base's at init; r is a multiple of ``groups``. DoRA is
refused (its norm would run over a kernel's input-channel rows). Saved in this library's format.

Multi-head attention, ``nn.MultiheadAttention`` with embedding size E (query, key and value of one
size: its packed ``in_proj_weight`` of shape (3E, E)), as PEFT's layer for it::

    W_in' = W_in + s · B_in A_in       A_in: (r, E),  B_in: (3E, r)
    W_out' = W_out + s · B_out A_out   A_out: (r, E), B_out: (E, r)

Both projections are adapted: ``nn.MultiheadAttention`` holds the packed input projection as a bare
parameter and never calls its ``out_proj`` (it passes ``out_proj.weight`` to its attention
function), so the layer runs the base module with the two adapted weights swapped in
(``torch.func.functional_call``); gradients reach A and B through them, and merging is exact.
Adapter dropout does not apply (the update is a weight, not a term on the input; PEFT ignores it
too), nor does DoRA (refused, as in PEFT). A module with separate query / key / value weights
(``kdim`` or ``vdim`` set) is refused. Targeting an attention's ``out_proj`` alone also works, through
:attr:`~lightning_lora.core.layer.AdapterLayer.weight`. Saved under PEFT's names (``lora_A.weight``,
``lora_B.weight``, ``base_layer.out_proj.lora_A.weight``, ``base_layer.out_proj.lora_B.weight``), so a
directory loads in PEFT and back with the same outputs.

Options of :class:`~lightning_lora.methods.lora.LoRAConfig` that concern linear layers only
(``fused``, ``fuse_siblings``, ``replay_inputs``, ``merged_training``) do not apply here: these
layers always run the plain formula above. DoRA (``use_dora``) works on both, as PEFT's
(:class:`_ModuleLoRA`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.config import adapter_torch_dtype
from ..core.dora import DoRAMerge
from ..core.layer import AdapterLayer, accumulate_dtype, no_autocast, with_update

if TYPE_CHECKING:
    from .lora import LoRAConfig

#: the base module types these layers adapt (``LoRA.supported_types`` adds them to ``nn.Linear``)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, *CONV_TYPES, *CONV_TRANSPOSE_TYPES, nn.MultiheadAttention)
#: the functional convolution of each kernel rank
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ModuleLoRA(DoRAMerge):
    """What the embedding and convolution layers share: DoRA's set-up (its merge, unmerge and
    ``delta_weight`` come from :class:`~lightning_lora.core.dora.DoRAMerge`, over each layer's
    :meth:`_scaled_ba` in :attr:`base_weight`'s layout).

    DoRA (``use_dora``, METHODS.md §1, as PEFT's DoRA embedding and convolution layers): ``W' = m ⊙
    (W0 + ΔW) / ν`` with ``ν = ‖W0 + ΔW‖`` per output feature (an embedding dimension; an output
    channel, over its input channels and kernel) and the trainable magnitude ``m`` starting at
    ``‖W0‖``, so the output equals the base at init. Forward, with the base output ``y0``:
    convolution ``y0 + (m/ν − 1) ⊙ (y0 − b) + (m/ν) ⊙ s·lora(x)``; embedding ``(m/ν) ⊙ (y0 +
    s·lora(x))``. ``ν`` is a constant in backward with ``dora_detach_norm`` (the default, the paper's
    §4.3). ``m`` is stored in PEFT's shape: (embedding_dim,) for an embedding, (1, C_out, 1, ...)
    for a convolution.
    """

    def _init_dora(self, config: LoRAConfig, dtype: torch.dtype, magnitude_shape: tuple[int, ...]) -> None:
        self.use_dora = config.use_dora
        self.dora_detach_norm = config.dora_detach_norm
        if not self.use_dora:
            self.register_parameter("lora_magnitude", None)
            return
        with torch.no_grad():
            w0 = self.base_weight
            norm = self._row_norm(w0.to(torch.promote_types(accumulate_dtype(w0), dtype)))
        self.lora_magnitude = nn.Parameter(norm.to(dtype).reshape(magnitude_shape))


class LoRAEmbedding(_ModuleLoRA):
    """LoRA on an ``nn.Embedding`` (module docstring). Parameters: ``lora_embedding_A`` (r,
    num_embeddings), ``lora_embedding_B`` (embedding_dim, r); with DoRA ``lora_magnitude``
    (embedding_dim,)."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude")
    #: PEFT keeps A and B as bare parameters (the file keys are the names themselves)
    file_key_map: ClassVar[dict[str, str]] = {"lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Embedding, config: LoRAConfig) -> None:
        if base_layer.max_norm is not None:
            raise ValueError(f"nn.Embedding with max_norm={base_layer.max_norm} renormalises its table in place "
                             "at every lookup, so no low-rank update can be kept apart from it; LoRA cannot adapt it")
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        dtype = adapter_torch_dtype(config.adapter_dtype)
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=dtype, device=device))
        nn.init.normal_(self.lora_embedding_B)
        self._init_dora(config, dtype, (self.out_features,))

    def _embed_scale(self) -> torch.Tensor | float | None:
        """The base's ``embed_scale`` (a scalar or a one-element tensor), or None."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise ValueError(f"{type(self.base_layer).__name__}.embed_scale has shape {tuple(scale.shape)}; "
                             "LoRA supports a scalar embed_scale only")
        return scale

    def _scaled_ba(self) -> torch.Tensor:
        """``s · B A``, shape (embedding_dim, num_embeddings) (:attr:`base_weight`'s layout, the table
        transposed), fp32 (fp64 for fp64 adapters)."""
        A, B = self.lora_embedding_A, self.lora_embedding_B
        acc = accumulate_dtype(A, B)
        with no_autocast(A.device):
            return self.scaling * (B.to(acc) @ A.to(acc))

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out + s · Aᵀ[x] Bᵀ`` (times ``embed_scale`` where the base has one; DoRA: the sum
        times ``m/ν``); ``x`` holds indices of any shape, ``base_out`` is (*x.shape, embedding_dim)."""
        dtype = base_out.dtype
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.to(dtype).t(), padding_idx=base.padding_idx,
                              scale_grad_by_freq=base.scale_grad_by_freq)
        out = self.scaling * (after_a @ self.lora_embedding_B.to(dtype).t())
        scale = self._embed_scale()
        if scale is not None:
            out = out * (scale.to(dtype) if isinstance(scale, torch.Tensor) else scale)
        if self.use_dora:  # the magnitude scales the whole row: W' = (m/ν)(W0 + ΔW)
            return self._dora_mag_scale(dtype) * (base_out + out)
        return base_out + out

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, r={self.r}, "
                f"dora={self.use_dora}, merged={self.merged}")


def _check_rank_per_group(base: nn.Module, r: int) -> None:
    """A grouped (transposed) convolution gives each group rank r / groups: r must divide evenly."""
    if r % base.groups:
        raise ValueError(f"{type(base).__name__} with groups={base.groups}: LoRA gives each group rank r/groups, "
                         f"so r must be a multiple of {base.groups} (got r={r})")


def _conv_adapter_setup(layer: AdapterLayer, config: LoRAConfig) -> tuple[torch.dtype, torch.device, tuple[int, ...], int]:
    """Set a (transposed) convolution layer's ``r``, ``groups``, ``scaling`` and ``dropout_p``; returns the
    adapter dtype, the base's device, its kernel size and groups, for building A and B."""
    base = layer.base_layer
    layer.r, layer.groups = config.r, base.groups
    layer.scaling, layer.dropout_p = config.scaling, config.dropout
    return adapter_torch_dtype(config.adapter_dtype), base.weight.device, tuple(base.kernel_size), base.groups


class LoRAConv(_ModuleLoRA):
    """LoRA on an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (module docstring). Parameters:
    ``lora_A`` (r, in_channels / groups, *kernel_size), ``lora_B`` (out_channels, r / groups, 1, ...);
    with DoRA ``lora_magnitude`` (1, out_channels, 1, ...)."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude")
    file_key_map: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                                              "lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        _check_rank_per_group(base_layer, config.r)
        super().__init__(base_layer)
        dtype, device, kernel, groups = _conv_adapter_setup(self, config)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features // groups, *kernel, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r // groups, *(1,) * len(kernel), dtype=dtype,
                                               device=device))
        _kaiming_or_gaussian(self.lora_A, config.init, self.r)
        self._init_dora(config, dtype, (1, self.out_features, *(1,) * len(kernel)))

    def _scaled_ba(self) -> torch.Tensor:
        """``ΔW[o, i, ...] = s · Σ_j B[o, j] A[j, i, ...]`` within each group (j over the group's r/g),
        the kernel's shape (out, in / groups, *k), fp32 (fp64 for fp64 adapters)."""
        A, B, g = self.lora_A, self.lora_B, self.groups
        acc = accumulate_dtype(A, B)
        with no_autocast(A.device):
            b = B.to(acc).reshape(g, self.out_features // g, self.r // g)
            a = A.to(acc).reshape(g, self.r // g, -1)
            return self.scaling * torch.bmm(b, a).reshape(self.base_layer.weight.shape)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out + s · conv₁ₓ₁(conv(dropout(x), A), B)`` (DoRA: module docstring); ``x`` (N, C_in,
        *spatial) or unbatched, ``base_out`` (N, C_out, *spatial')."""
        dtype = base_out.dtype
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        # the base's own conv call: its stride, padding, dilation, padding mode and groups
        h = self.base_layer._conv_forward(h.to(dtype), self.lora_A.to(dtype), None)
        out = self.scaling * _CONV_FNS[len(self.base_layer.kernel_size)](h, self.lora_B.to(dtype), groups=self.groups)
        if not self.use_dora:
            return base_out + out
        # the channel dim of the output: 1, or 0 for an unbatched input
        shape = (-1, *(1,) * len(self.base_layer.kernel_size))
        scale = self._dora_mag_scale(dtype).reshape(shape)
        bias = self.base_layer.bias
        no_bias = base_out if bias is None else base_out - bias.to(dtype).reshape(shape)
        return base_out + (scale - 1) * no_bias + scale * out

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_features}, out_channels={self.out_features}, r={self.r}, "
                f"groups={self.groups}, dora={self.use_dora}, merged={self.merged}")


class LoRAConvTranspose(AdapterLayer):
    """LoRA on an ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (module docstring). Parameters: ``lora_A``
    (r, in_channels / groups, 1, ...), ``lora_B`` (r, out_channels / groups, *kernel_size)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        if config.use_dora:
            raise ValueError(f"DoRA is not implemented for {type(base_layer).__name__} (PEFT has no LoRA for it either); "
                             "set use_dora=False or exclude the module")
        _check_rank_per_group(base_layer, config.r)
        super().__init__(base_layer)
        dtype, device, kernel, groups = _conv_adapter_setup(self, config)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features // groups, *(1,) * len(kernel), dtype=dtype,
                                               device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.r, self.out_features // groups, *kernel, dtype=dtype, device=device))
        _kaiming_or_gaussian(self.lora_A, config.init, self.r)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW[i, o, ...] = s · Σ_j A[j, i] B[j, o, ...]`` within each group, the kernel's shape
        (in, out / groups, *k), fp32 (fp64 for fp64 adapters)."""
        A, B, g = self.lora_A, self.lora_B, self.groups
        acc = accumulate_dtype(A, B)
        with no_autocast(A.device):
            a = A.to(acc).reshape(g, self.r // g, self.in_features // g)
            b = B.to(acc).reshape(g, self.r // g, -1)
            return self.scaling * torch.bmm(a.transpose(1, 2), b).reshape(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """``convT(x, W) + s · convT(A x, B)`` with the base's geometry; ``x`` (N, C_in, *spatial) or
        unbatched, ``output_size`` as the base takes it."""
        base = self.base_layer
        base_out = base(x, output_size)
        if self.disabled or self.merged:
            return base_out
        dtype = base_out.dtype
        dims = len(base.kernel_size)
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        h = _CONV_FNS[dims](h.to(dtype), self.lora_A.to(dtype), groups=self.groups)  # A: 1x1
        output_padding = base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size, dims,
                                              base.dilation)
        out = _CONV_TRANSPOSE_FNS[dims](h, self.lora_B.to(dtype), None, base.stride, base.padding, output_padding,
                                        self.groups, base.dilation)
        return base_out + self.scaling * out

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_features}, out_channels={self.out_features}, r={self.r}, "
                f"groups={self.groups}, merged={self.merged}")


class LoRAParameters(AdapterLayer):
    """LoRA on bare parameters of one module (``LoRAConfig.target_parameters``, PEFT's option of that
    name): the fused expert weights of transformers 5's mixture-of-experts layers (Mixtral's
    ``experts.gate_up_proj``, (E, 2·I, H)), which no ``nn.Linear`` holds. For each targeted parameter
    ``name``, in PEFT's layout and arithmetic (its ``ParamWrapper``): a 2-D parameter (out, in) gets
    ``A`` (r, in), ``B`` (out, r), ``ΔW = s·B A``; a 3-D one (E, d1, d2) one rank-r update per expert,
    ``A`` (r·E, in) and ``B`` (out, r·E) with (in, out) = (d2, d1), or (d1, d2) where the module has
    ``is_transposed = True``; ``A`` is Kaiming-uniform and ``B`` = 0.

    The module runs with every ``W + ΔW`` swapped in (``torch.func.functional_call``; by hand under
    ``torch.jit.trace``), so gradients reach A and B through them and merging is exact. Parameters are
    named ``lora_A__<name>`` / ``lora_B__<name>``; the file names are PEFT's, whose wrappers nest one
    per parameter (the module's first targeted parameter innermost: ``base_layer.lora_A.weight``).
    Dropout and DoRA are refused, as in PEFT."""

    named_adapters = False  # an expert stack's output is not additive in its update

    def __init__(self, base_layer: nn.Module, names: list[str], config: LoRAConfig) -> None:
        if config.dropout:
            raise ValueError(f"target_parameters: dropout={config.dropout} cannot act on a parameter's update "
                             "(there is no input to drop); set dropout=0")
        if config.use_dora:
            raise ValueError("target_parameters: DoRA is not implemented for bare parameters (PEFT has none)")
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        self.names = list(names)
        dtype = adapter_torch_dtype(config.adapter_dtype)
        self.layouts: dict[str, tuple[int, int, int, bool]] = {}
        keys: dict[str, str] = {}
        for depth, name in enumerate(reversed(self.names)):  # the last name's wrapper is PEFT's outermost
            param = getattr(base_layer, name)
            if param.dim() == 2:
                experts, (n_out, n_in), swapped = 1, param.shape, True
            elif param.dim() == 3:
                experts, n_in, n_out = param.shape
                swapped = not getattr(base_layer, "is_transposed", False)
                if swapped:
                    n_in, n_out = n_out, n_in
            else:
                raise ValueError(f"target_parameters: {type(base_layer).__name__}.{name} has {param.dim()} dimensions; "
                                 "LoRA adapts 2-D and 3-D (one matrix per expert) parameters")
            self.layouts[name] = (experts, n_in, n_out, swapped)
            a = nn.Parameter(torch.empty(self.r * experts, n_in, dtype=dtype, device=param.device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(f"lora_A__{name}", a)
            self.register_parameter(f"lora_B__{name}", nn.Parameter(torch.zeros(n_out, self.r * experts, dtype=dtype,
                                                                                 device=param.device)))
            keys[f"lora_A__{name}"] = "base_layer." * depth + "lora_A.weight"
            keys[f"lora_B__{name}"] = "base_layer." * depth + "lora_B.weight"
        self.adapter_param_names = tuple(keys)
        self.file_key_map = keys

    @classmethod
    def _layer_shape(cls, base_layer: nn.Module) -> tuple[int, int, bool]:
        return 0, 0, False  # no single (in, out): one per parameter, in ``layouts``

    def delta_weights(self, only: str | None = None) -> dict[str, torch.Tensor]:
        """Parameter name -> ``ΔW`` in the parameter's shape, fp32 (PEFT's ``get_delta_weight``); with
        ``only``, that parameter's alone."""
        out: dict[str, torch.Tensor] = {}
        for name in [only] if only is not None else self.names:
            experts, _, n_out, swapped = self.layouts[name]
            A, B = self.get_parameter(f"lora_A__{name}"), self.get_parameter(f"lora_B__{name}")
            acc = accumulate_dtype(A, B)
            with no_autocast(A.device):
                a, b = A.to(acc), B.to(acc)
                if experts == 1:
                    out[name] = self.scaling * (b @ a)
                else:
                    a = a.reshape(experts, self.r, -1)  # (E, r, in)
                    b = b.reshape(n_out, self.r, experts)  # (out, r, E): the expert index runs fastest in B
                    out[name] = self.scaling * torch.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b, a)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The one targeted parameter's ``ΔW`` (:meth:`delta_weights` for several)."""
        if len(self.names) != 1:
            raise NotImplementedError(f"{len(self.names)} parameters have one update each: use delta_weights()")
        return self.delta_weights()[self.names[0]]

    def _expert_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` in ``dtype`` with ``ΔW = s · lhs @ rhs`` per expert for a 3-D parameter (PEFT's
        ``get_delta_factors``): (E, out, r) and (E, r, in), or transposed for the (E, in, out) layout."""
        experts, _, n_out, swapped = self.layouts[name]
        a = self.get_parameter(f"lora_A__{name}").to(dtype).reshape(experts, self.r, -1)  # (E, r, in)
        b = self.get_parameter(f"lora_B__{name}").to(dtype).reshape(n_out, self.r, experts).permute(2, 0, 1)  # (E, out, r)
        return (b, a) if swapped else (a.transpose(1, 2), b.transpose(1, 2))

    def _adapted(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``W + ΔW`` in the parameter's dtype. A 3-D fp32 / fp64 parameter takes one
        ``baddbmm`` (no separate ``ΔW`` the size of the expert stack); a bf16 / fp16 one adds ``ΔW``
        formed in fp32, as merging does."""
        base = self.base_layer
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            w = getattr(base, name)
            experts = self.layouts[name][0]
            if experts > 1 and w.dtype in (torch.float32, torch.float64):
                with no_autocast(w.device):
                    out[name] = torch.baddbmm(w, *self._expert_factors(name, w.dtype), alpha=self.scaling)
            else:
                dw = self.delta_weights(only=name)[name]
                out[name] = with_update(w, dw)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own forward, with every targeted parameter ``W + ΔW``."""
        base = self.base_layer
        if self.disabled or self.merged:
            return base(*args, **kwargs)
        return _call_with(base, self._adapted(), args, kwargs)

    def weight_updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each targeted parameter with its ``ΔW`` (what merging adds)."""
        return [(getattr(self.base_layer, name), dw) for name, dw in self.delta_weights().items()]

    def extra_repr(self) -> str:
        return f"parameters={self.names}, r={self.r}, merged={self.merged}"


class TiedLoRALinear(AdapterLayer):
    """An ``nn.Linear`` whose weight is an adapted embedding's table (a language model's tied output
    head), running that embedding's adapter (LoRA's ``ensure_weight_tying``): with the table E (n, d),
    ``ΔE = s·(B A)ᵀ`` of the :class:`LoRAEmbedding`, the head computes ``x (E + ΔE)ᵀ``::

        y = base(x) + s · (dropout(x) B) A       B: (d, r), A: (r, n), the embedding's own

    It has no parameters of its own and saves nothing; ``merged`` is the embedding's: the embedding's
    merge writes ``ΔE`` into the shared table, which both then compute with, and this layer's own
    ``merge`` / ``unmerge`` do nothing. ``embed_scale`` belongs to the lookup, not to the head."""

    named_adapters = False  # it follows its embedding's one adapter

    def __init__(self, base_layer: nn.Linear, source: LoRAEmbedding, dropout: float = 0.0) -> None:
        if tuple(base_layer.weight.shape) != (source.in_features, source.out_features):
            raise ValueError(f"a tied head of weight shape {tuple(base_layer.weight.shape)} does not match the "
                             f"embedding table ({source.in_features}, {source.out_features})")
        # not a submodule: the embedding's parameters belong to it (saved, counted, optimized once)
        object.__setattr__(self, "tied_source", source)
        super().__init__(base_layer)
        self.dropout_p = dropout

    @property  # type: ignore[override]
    def merged(self) -> bool:
        return self.tied_source.merged

    @merged.setter
    def merged(self, value: bool) -> None:  # AdapterLayer.__init__ sets False; the embedding's flag rules
        pass

    def delta_weight(self) -> torch.Tensor:
        """``ΔE = s·(B A)ᵀ``, shape (n, d) (the head's weight layout), fp32."""
        return self.tied_source._scaled_ba().t()

    def file_extras(self) -> dict[str, torch.Tensor]:
        """PEFT's tied head factors (its ``lora_A = Bᵀ``, ``lora_B = Aᵀ`` of the embedding), which a PEFT
        directory holds and PEFT expects; loading here reads the embedding's own."""
        src = self.tied_source
        return {"lora_A.weight": src.lora_embedding_B.t(), "lora_B.weight": src.lora_embedding_A.t()}

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out + s · (dropout(x) B) A``; ``x`` (..., d), ``base_out`` (..., n)."""
        src = self.tied_source
        dtype = base_out.dtype
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return base_out + src.scaling * ((h.to(dtype) @ src.lora_embedding_B.to(dtype)) @ src.lora_embedding_A.to(dtype))

    def merge(self) -> None:
        """Nothing: the embedding's merge writes ``ΔE`` into the table this head shares (so any order
        of the model's layers merges the update once)."""

    def unmerge(self) -> None:
        """Nothing: the embedding's unmerge takes ``ΔE`` out of the shared table."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to an embedding's adapter"


def _call_with(module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``module(*args, **kwargs)`` with the parameters named in ``tensors`` (dotted, relative to
    ``module``) replaced by those tensors for the call, differentiably: ``torch.func.functional_call``,
    or, under ``torch.jit.trace`` (which that refuses), the entries swapped by hand and put back."""
    if not torch.jit.is_tracing():
        return functional_call(module, tensors, args, kwargs)
    owners = {name: module.get_submodule(name.rpartition(".")[0])._parameters for name in tensors}
    saved = {name: owners[name][name.rpartition(".")[2]] for name in tensors}
    try:
        for name, t in tensors.items():
            owners[name][name.rpartition(".")[2]] = t
        return module(*args, **kwargs)
    finally:
        for name, t in saved.items():
            owners[name][name.rpartition(".")[2]] = t


def _kaiming_or_gaussian(a: torch.Tensor, init: str, r: int) -> None:
    """A linear layer's A init: Kaiming-uniform, or N(0, 1/r²) with ``init="gaussian"`` (as PEFT)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        nn.init.normal_(a, std=1.0 / r)


class _AdaptedProjection:
    """What ``LoRAMultiheadAttention.out_proj`` gives: the output projection's adapted ``weight`` and
    its ``bias``, for callers that read them (the inference fast paths of ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder``); the module itself is ``layer.base_layer.out_proj``."""

    def __init__(self, layer: LoRAMultiheadAttention) -> None:
        self._layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return self._layer.out_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._layer.base_layer.out_proj.bias

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer.base_layer.out_proj, name)


class LoRAMultiheadAttention(AdapterLayer):
    """LoRA on an ``nn.MultiheadAttention`` (module docstring): its packed input projection and its
    output projection. Parameters: ``lora_A`` (r, E), ``lora_B`` (3E, r), ``lora_out_A`` (r, E),
    ``lora_out_B`` (E, r); :meth:`delta_weight` is the input projection's (3E, E), the output
    projection's is :meth:`out_proj_delta_weight` (E, E). The attributes the base's callers read
    (``in_proj_weight``, ``out_proj``, ``batch_first``, ``num_heads``, ...) are served adapted, so
    ``nn.TransformerEncoderLayer``'s inference fast path runs the adapted attention."""

    adapter_param_names = ("lora_A", "lora_B", "lora_out_A", "lora_out_B")
    file_key_map: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
        "lora_out_A": "base_layer.out_proj.lora_A.weight", "lora_out_B": "base_layer.out_proj.lora_B.weight"}

    named_adapters = False  # its output (a tuple) is not additive in the update

    def __init__(self, base_layer: nn.MultiheadAttention, config: LoRAConfig) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim set keeps separate query/key/value weights; "
                             "LoRA adapts the packed in_proj_weight only (as PEFT)")
        if config.use_dora:
            raise ValueError("DoRA is not implemented for nn.MultiheadAttention (PEFT has none either); "
                             "set use_dora=False or exclude the attention module")
        if config.dropout > 0:
            warnings.warn(f"dropout={config.dropout} does not apply to nn.MultiheadAttention's LoRA: its update "
                          "acts as a weight (as in PEFT)", stacklevel=4)
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        dtype = adapter_torch_dtype(config.adapter_dtype)
        device = base_layer.in_proj_weight.device
        e = base_layer.embed_dim
        self.lora_A = nn.Parameter(torch.empty(self.r, e, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(3 * e, self.r, dtype=dtype, device=device))
        self.lora_out_A = nn.Parameter(torch.empty(self.r, e, dtype=dtype, device=device))
        self.lora_out_B = nn.Parameter(torch.zeros(e, self.r, dtype=dtype, device=device))
        _kaiming_or_gaussian(self.lora_A, config.init, self.r)
        _kaiming_or_gaussian(self.lora_out_A, config.init, self.r)

    @property
    def base_weight(self) -> torch.Tensor:
        """The packed input projection, (3E, E)."""
        return self.base_layer.in_proj_weight

    @staticmethod
    def _scaled(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
        acc = accumulate_dtype(a, b)
        with no_autocast(a.device):
            return scaling * (b.to(acc) @ a.to(acc))

    def delta_weight(self) -> torch.Tensor:
        """``s · B_in A_in``, the input projection's update, shape (3E, E), fp32."""
        return self._scaled(self.lora_B, self.lora_A, self.scaling)

    def out_proj_delta_weight(self) -> torch.Tensor:
        """``s · B_out A_out``, the output projection's update, shape (E, E), fp32."""
        return self._scaled(self.lora_out_B, self.lora_out_A, self.scaling)

    def _adapted(self, w: torch.Tensor, dw_fn) -> torch.Tensor:
        if self.disabled or self.merged:
            return w
        return with_update(w, dw_fn())

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The input projection this layer computes with, (3E, E) in the base dtype."""
        return self._adapted(self.base_layer.in_proj_weight, self.delta_weight)

    @property
    def out_proj_weight(self) -> torch.Tensor:
        """The output projection's weight this layer computes with, (E, E) in the base dtype."""
        return self._adapted(self.base_layer.out_proj.weight, self.out_proj_delta_weight)

    @property
    def out_proj(self) -> _AdaptedProjection:
        return _AdaptedProjection(self)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's ``forward(query, key, value, ...)`` with both adapted weights swapped in: returns
        ``(attn_output, attn_weights)`` as the base does."""
        if self.disabled or self.merged:
            return self.base_layer(query, *args, **kwargs)
        swapped = {"in_proj_weight": self.in_proj_weight, "out_proj.weight": self.out_proj_weight}
        return _call_with(self.base_layer, swapped, (query, *args), kwargs)

    def base_biases(self) -> list[nn.Parameter]:
        """``in_proj_bias`` and ``out_proj.bias`` (where the base has them): what ``bias="lora_only"``
        trains. (PEFT 0.21.2 trains ``out_proj.bias`` only, under another name: its files for an
        attention adapter with trained biases do not load here, nor ours there.)"""
        base = self.base_layer
        return [b for b in (base.in_proj_bias, base.out_proj.bias) if isinstance(b, nn.Parameter)]

    def merge_masks(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, int | None]:
        """The base's ``merge_masks`` (``nn.TransformerEncoderLayer``'s fast path calls it)."""
        return self.base_layer.merge_masks(*args, **kwargs)

    def weight_updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Both projections with their updates: merging writes into ``in_proj_weight`` and ``out_proj.weight``."""
        base = self.base_layer
        return [(base.in_proj_weight, self.delta_weight()), (base.out_proj.weight, self.out_proj_delta_weight())]

    def extra_repr(self) -> str:
        return f"embed_dim={self.in_features}, r={self.r}, merged={self.merged}"


def _base_attribute(name: str) -> property:
    return property(lambda self: getattr(self.base_layer, name),
                    doc=f"The base ``nn.MultiheadAttention``'s ``{name}``.")


# what nn.TransformerEncoderLayer / nn.TransformerEncoder read of their self_attn besides the weights
for _name in ("embed_dim", "num_heads", "head_dim", "batch_first", "_qkv_same_embed_dim", "in_proj_bias",
              "kdim", "vdim", "bias_k", "bias_v", "add_zero_attn"):
    setattr(LoRAMultiheadAttention, _name, _base_attribute(_name))


def make_module_layer(base: nn.Module, config: LoRAConfig) -> AdapterLayer:
    """The LoRA layer for an embedding, (transposed) convolution or multi-head attention ``base``
    (``LoRA.make_layer`` for those)."""
    if isinstance(base, nn.Embedding):
        return LoRAEmbedding(base, config)
    if isinstance(base, nn.MultiheadAttention):
        return LoRAMultiheadAttention(base, config)
    if isinstance(base, CONV_TRANSPOSE_TYPES):
        return LoRAConvTranspose(base, config)
    return LoRAConv(base, config)


__all__ = ["LoRAConv", "LoRAConvTranspose", "LoRAEmbedding", "LoRAMultiheadAttention", "LoRAParameters", "MODULE_TYPES", "TiedLoRALinear", "make_module_layer"]
