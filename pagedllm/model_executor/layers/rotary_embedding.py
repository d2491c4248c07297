"""Rotary position embeddings (RoPE) and their frequency-scaling variants.

The cos/sin table is a non-persistent buffer computed from Python scalars, so a model built
on the meta device gets real values back from `init_cache()` after materialisation.
Scaling variants subclass `RotaryEmbedding` and override `_compute_inv_freq`; `get_rope`
picks one from a registry keyed by the HF `rope_type`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pagedllm import cpu_ops

# Every layer of a model has the same table: share one tensor per (variant, parameters, device)
# instead of one per layer (2 GiB on Llama-3.1-8B at 131k positions). Weak values: a table
# lives as long as some model uses it.
_SHARED_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` dims of each head of q and k."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox_style: bool = True,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 != 0 or rotary_dim > head_size:
            raise ValueError(f"bad rotary_dim {rotary_dim} for head_size {head_size}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.is_neox_style = is_neox_style
        # [max_position, rotary_dim]: cos of the rotary_dim/2 frequencies, then sin.
        self.register_buffer(
            "cos_sin_cache", torch.empty(max_position, rotary_dim, dtype=torch.float32),
            persistent=False,
        )
        if self.cos_sin_cache.device.type != "meta":
            self.init_cache()

    def _compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device="cpu")
        return 1.0 / (self.base ** (exponents.float() / self.rotary_dim))

    def _attention_scaling(self) -> float:
        return 1.0

    @torch.no_grad()
    def init_cache(self) -> None:
        """(Re)computes the cos/sin table on the buffer's current device (shared across layers)."""
        device = self.cos_sin_cache.device
        if device.type == "meta":
            return
        scalars = tuple(
            sorted((k, v) for k, v in vars(self).items() if isinstance(v, (int, float, str)))
        )
        key = (type(self).__name__, scalars, str(device))
        shared = _SHARED_TABLES.get(key)
        if shared is None:
            shared = self._compute_cos_sin_table().to(device)
            _SHARED_TABLES[key] = shared
        self.cos_sin_cache = shared

    def _compute_cos_sin_table(self) -> torch.Tensor:
        """[max_position, rotary_dim]: cos then sin of every position's angles, on the CPU."""
        return _cos_sin(
            torch.arange(self.max_position, dtype=torch.float32), self._compute_inv_freq(),
            self._attention_scaling(),
        )

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, num_heads, rotary_dim]; cos/sin: [num_tokens, 1, rotary_dim // 2]
        if self.is_neox_style:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        query: torch.Tensor,  # [num_tokens, num_heads * head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (query, key). CUDA and the CPU ops rotate the given tensors in place and
        return them; the plain torch path returns new ones. Callers use the return values
        and must not reuse the inputs."""
        if query.is_cuda:
            # Triton kernel: rotates q and k in place (they may be views into the QKV output).
            from pagedllm.model_executor.layers.ops.rotary import rotary_embedding

            rotary_embedding(
                positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox_style
            )
            return query, key
        if (query.dim() == 2 and key.dim() == 2 and positions.dtype == torch.int64
                and query.stride(-1) == 1 and key.stride(-1) == 1
                and self.cos_sin_cache.dtype == torch.float32 and cpu_ops.supports(query, key)):
            # One C++ call rotating q and k in place, the torch path's roundings.
            cpu_ops.rope_(positions, query, key, self.cos_sin_cache, self.head_size,
                          self.is_neox_style)
            return query, key
        return self._forward_torch(positions, query, key)

    def _forward_torch(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain torch rotation (new tensors; the reference of the CPU op)."""
        num_tokens = positions.shape[0]
        cos, sin, cos2, sin2 = _step_cos_sin(self.cos_sin_cache, positions, query.dtype)
        out = []
        for x in (query, key):
            x = x.view(num_tokens, -1, self.head_size)
            if self.is_neox_style and self.rotary_dim == self.head_size:
                # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] as x * [cos, cos] +
                # [x2, x1] * [-sin, sin]: the same products and sums (bit for bit), in 4 ops.
                rot = torch.mul(x, cos2).add_(x.roll(self.rotary_dim // 2, -1).mul_(sin2))
            else:
                rot = self._rotate(x[..., : self.rotary_dim], cos, sin)
            if self.rotary_dim < self.head_size:
                rot = torch.cat([rot, x[..., self.rotary_dim :]], dim=-1)
            out.append(rot.reshape(num_tokens, -1))
        return out[0], out[1]


# The cos/sin rows of the last step's positions, shared by every layer of the step (all layers
# get the same `positions` tensor and the same shared table). Weak references, so the cache
# keeps neither alive; positions' version counter catches a buffer rewritten in place.
_step_cache: dict[str, Any] = {}


def _step_cos_sin(
    table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin) [num_tokens, 1, rotary_dim // 2] and ([cos, cos], [-sin, sin])
    [num_tokens, 1, rotary_dim] of `positions`, in `dtype`."""
    key = (positions._version, dtype)
    if (_step_cache.get("key") == key and _step_cache["positions"]() is positions
            and _step_cache["table"]() is table):
        return _step_cache["cos_sin"]
    cos, sin = table.index_select(0, positions).chunk(2, dim=-1)
    cos = cos.unsqueeze(1).to(dtype)
    sin = sin.unsqueeze(1).to(dtype)
    cos_sin = (cos, sin, torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
    _step_cache.update(key=key, positions=weakref.ref(positions), table=weakref.ref(table),
                       cos_sin=cos_sin)
    return cos_sin


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    freqs = torch.outer(positions, inv_freq)  # [num_positions, rotary_dim // 2]
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """Positions divided by `factor` (HF rope_type "linear")."""

    def __init__(self, *args: Any, factor: float, **kwargs: Any) -> None:
        self.factor = factor
        super().__init__(*args, **kwargs)

    def _compute_inv_freq(self) -> torch.Tensor:
        return super()._compute_inv_freq() / self.factor


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama-3.1 scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp
    between (HF rope_type "llama3")."""

    def __init__(
        self,
        *args: Any,
        factor: float,
        low_freq_factor: float,
        high_freq_factor: float,
        original_max_position: int,
        **kwargs: Any,
    ) -> None:
        self.factor = factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.original_max_position = original_max_position
        super().__init__(*args, **kwargs)

    def _compute_inv_freq(self) -> torch.Tensor:
        return llama3_inv_freq(
            super()._compute_inv_freq(), self.factor, self.low_freq_factor,
            self.high_freq_factor, self.original_max_position,
        )  # fmt: skip


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_max_position: int,
) -> torch.Tensor:
    """Llama-3 scaling of RoPE frequencies (HF rope_type "llama3"): wavelengths past
    original / low_freq_factor divided by `factor`, those under original / high_freq_factor
    kept, a smooth ramp between."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class YaRNScalingRotaryEmbedding(RotaryEmbedding):
    """YaRN (HF rope_type "yarn"): each frequency blends the interpolated (divided by
    `factor`) and the original value by a linear ramp over the dims between the beta_fast and
    beta_slow rotation counts at the pretraining length; cos/sin are scaled by the attention
    factor (0.1 ln(factor) + 1, or the DeepSeek mscale / mscale_all_dim ratio)."""

    def __init__(
        self,
        *args: Any,
        factor: float,
        original_max_position: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
        mscale: float | None = None,
        mscale_all_dim: float | None = None,
        truncate: bool = True,
        **kwargs: Any,
    ) -> None:
        self.factor = factor
        self.original_max_position = original_max_position
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.truncate = truncate
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        self.attention_factor = float(attention_factor)
        super().__init__(*args, **kwargs)

    def _correction_dim(self, num_rotations: float) -> float:
        """The dim whose wavelength fits `num_rotations` times into the pretraining length."""
        d = self.rotary_dim
        ratio = self.original_max_position / (num_rotations * 2 * math.pi)
        return d * math.log(ratio) / (2 * math.log(self.base))

    def _compute_inv_freq(self) -> torch.Tensor:
        extrapolated = super()._compute_inv_freq()
        interpolated = extrapolated / self.factor
        low = self._correction_dim(self.beta_fast)
        high = self._correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.rotary_dim - 1)
        if low == high:
            high += 0.001  # a step, not a division by zero
        ramp = ((torch.arange(self.rotary_dim // 2, dtype=torch.float32) - low) / (high - low))
        keep = 1 - ramp.clamp(0, 1)  # 1: original frequency (fast dims), 0: interpolated
        return interpolated * (1 - keep) + extrapolated * keep

    def _attention_scaling(self) -> float:
        return self.attention_factor


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class LongRoPEScalingRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3/3.5/4, HF rope_type "longrope"): each frequency divided by its own
    factor, `short_factor` for positions below the pretraining length and `long_factor` from
    there on; cos/sin scaled by sqrt(1 + ln(factor) / ln(original)) (or `attention_factor`),
    factor = max_position / original unless the config gives it.

    Departure from HF: HF switches the whole sequence to the long factors once it grows past
    the pretraining length; here the choice is per position, so a request's tokens do not
    depend on how it was chunked, batched or preempted. Sequences within the pretraining
    length (where both use the short factors) match HF exactly.
    """

    def __init__(
        self,
        *args: Any,
        short_factor: list[float],
        long_factor: list[float],
        original_max_position: int,
        factor: float | None = None,
        attention_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.short_factor = tuple(float(f) for f in short_factor)
        self.long_factor = tuple(float(f) for f in long_factor)
        # A string, so the factors are part of the shared-table key (which keeps scalars).
        self.factors_key = repr((self.short_factor, self.long_factor))
        self.original_max_position = original_max_position
        max_position = args[2] if len(args) > 2 else kwargs["max_position"]
        factor = factor if factor is not None else max_position / original_max_position
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(
                1 + math.log(factor) / math.log(original_max_position))
        self.attention_factor = float(attention_factor)
        half = int(args[1] if len(args) > 1 else kwargs["rotary_dim"]) // 2
        if len(self.short_factor) != half or len(self.long_factor) != half:
            raise ValueError(
                f"longrope short_factor/long_factor need rotary_dim / 2 = {half} values, got "
                f"{len(self.short_factor)} and {len(self.long_factor)}"
            )
        super().__init__(*args, **kwargs)

    def _inv_freq_with(self, factors: tuple[float, ...]) -> torch.Tensor:
        return super()._compute_inv_freq() / torch.tensor(factors, dtype=torch.float32)

    def _attention_scaling(self) -> float:
        return self.attention_factor

    def _compute_cos_sin_table(self) -> torch.Tensor:
        t = torch.arange(self.max_position, dtype=torch.float32)
        split = min(self.original_max_position, self.max_position)
        scale = self._attention_scaling()
        short = _cos_sin(t[:split], self._inv_freq_with(self.short_factor), scale)
        long = _cos_sin(t[split:], self._inv_freq_with(self.long_factor), scale)
        return torch.cat([short, long], dim=0)


_RopeFactory = Callable[[int, int, int, float, bool, dict[str, Any]], RotaryEmbedding]


def _default(hs: int, rd: int, mp: int, base: float, neox: bool, _: dict) -> RotaryEmbedding:
    return RotaryEmbedding(hs, rd, mp, base, neox)


def _linear(hs: int, rd: int, mp: int, base: float, neox: bool, s: dict) -> RotaryEmbedding:
    factor = float(s["factor"])  # the table covers the extended length, as in vLLM
    return LinearScalingRotaryEmbedding(hs, rd, int(mp * factor), base, neox, factor=factor)


def _llama3(hs: int, rd: int, mp: int, base: float, neox: bool, s: dict) -> RotaryEmbedding:
    return Llama3RotaryEmbedding(
        hs,
        rd,
        mp,
        base,
        neox,
        factor=float(s["factor"]),
        low_freq_factor=float(s.get("low_freq_factor", 1.0)),
        high_freq_factor=float(s.get("high_freq_factor", 4.0)),
        original_max_position=int(s.get("original_max_position_embeddings", 8192)),
    )


def _yarn(hs: int, rd: int, mp: int, base: float, neox: bool, s: dict) -> RotaryEmbedding:
    original = int(s.get("original_max_position_embeddings") or mp)
    factor = s.get("factor")
    factor = float(factor) if factor is not None else mp / original
    opt = {k: s[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if s.get(k)}
    return YaRNScalingRotaryEmbedding(
        # The table covers the extended length (vLLM: original x factor).
        hs, rd, max(mp, int(original * factor)), base, neox,
        factor=factor, original_max_position=original,
        beta_fast=float(s.get("beta_fast") or 32), beta_slow=float(s.get("beta_slow") or 1),
        truncate=bool(s.get("truncate", True)), **{k: float(v) for k, v in opt.items()},
    )  # fmt: skip


def _longrope(hs: int, rd: int, mp: int, base: float, neox: bool, s: dict) -> RotaryEmbedding:
    if "original_max_position_embeddings" not in s:
        raise ValueError("longrope scaling needs original_max_position_embeddings")
    opt = {k: float(s[k]) for k in ("factor", "attention_factor") if s.get(k) is not None}
    return LongRoPEScalingRotaryEmbedding(
        hs, rd, mp, base, neox, short_factor=list(s["short_factor"]),
        long_factor=list(s["long_factor"]),
        original_max_position=int(s["original_max_position_embeddings"]), **opt,
    )  # fmt: skip


_ROPE_TYPES: dict[str, _RopeFactory] = {
    "default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn,
    "longrope": _longrope,
}  # fmt: skip


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    is_neox_style: bool = True,
) -> RotaryEmbedding:
    """Builds the rotary embedding named by `rope_scaling["rope_type"]` (or "type")."""
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(_ROPE_TYPES)}")
    return _ROPE_TYPES[rope_type](
        head_size, rotary_dim, max_position, float(base), is_neox_style, rope_scaling or {}
    )


def rope_params_from_config(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a transformers config, old or new (rope_parameters)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling
    theta = getattr(hf_config, "rope_theta", None) or 10000.0
    scaling = getattr(hf_config, "rope_scaling", None)
    original = getattr(hf_config, "original_max_position_embeddings", None)
    if scaling and original and "original_max_position_embeddings" not in scaling:
        # Phi-3 keeps the pretraining length beside rope_scaling, not inside it.
        scaling = {**scaling, "original_max_position_embeddings": original}
    return float(theta), scaling
