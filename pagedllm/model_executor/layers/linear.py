"""Linear layers: column/row tensor-parallel, with weights and matmul owned by a LinearMethod.

A layer decides how its weight is split across tensor-parallel ranks; its `LinearMethod`
decides what tensors hold the weight (plain, fp8, packed int4 ...) and how to multiply.
Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)` that copies this
rank's slice of a full checkpoint tensor. Parameters mark the dimension split across output
features with `output_dim` and the one split across input features with `input_dim`.

Quantized parameters may be packed: `packed_dim` names the dimension that stores
`packed_factor` logical values per element (an int, or a Fraction such as 32/3 for 3-bit
GPTQ, which packs 32 values in 3 int32 words). Offsets and sizes of fused shards are given in
logical features and converted with `_packed`. Group-wise tensors (scales, zeros) simply have
fewer rows along `input_dim`; the method that creates them checks that each partition holds
whole groups. A parameter marked `same_for_all_shards` (GPTQ's `g_idx` of a fused layer) is
loaded from every shard and must agree across them.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.model_executor.layers.utils import dense_linear, set_weight_attrs


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


class LinearMethod:
    """Creates a linear layer's weight tensors and applies the layer.

    Invariant: `create_weights` registers parameters on `layer` with `output_dim`/`input_dim`
    attributes where they are sharded; the layer then attaches its `weight_loader` to every
    parameter the method did not give a `weight_loader` of its own.
    """

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        raise NotImplementedError

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after every checkpoint tensor is loaded (repack, quantize on the fly)."""


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [output_size_per_partition, input_size_per_partition] in params_dtype."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Common state of every linear layer; subclasses define sharding and `weight_loader`."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()

    def _attach_loader(self) -> None:
        # A linear method may give a parameter its own loader (per-shard scales of a fused
        # layer); every other parameter is sharded by the layer.
        for param in self.parameters(recurse=False):
            if getattr(param, "weight_loader", None) is None:
                set_weight_attrs(param, {"weight_loader": self.weight_loader})

    def _create_weights(
        self, input_size_per_partition: int, output_partition_sizes: list[int]
    ) -> None:
        """Lets the linear method register this rank's weight tensors (remembered so that
        `replace_linear_method` can create them again)."""
        self._weight_shape_args = (input_size_per_partition, list(output_partition_sizes))
        self.linear_method.create_weights(
            self, input_size_per_partition, list(output_partition_sizes), self.input_size,
            self.output_size, self.params_dtype,
        )

    def replace_linear_method(self, method: LinearMethod) -> None:
        """Swaps the linear method (quantization) on a built, not yet loaded layer: the old
        method's tensors are dropped and the new method creates its own; the bias stays."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        self.linear_method = method
        self._create_weights(*self._weight_shape_args)
        self._attach_loader()

    def _create_bias(self, size: int, output_dim: int | None) -> None:
        bias = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
        if output_dim is not None:
            set_weight_attrs(bias, {"output_dim": output_dim})
        self.register_parameter("bias", bias)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        raise NotImplementedError


def _load_rank_shard(
    param: nn.Parameter, loaded_weight: torch.Tensor, dim_attr: str, tp_rank: int, tp_size: int
) -> None:
    """Copies this rank's slice of a full checkpoint tensor along the parameter's
    `dim_attr` dimension ("output_dim" or "input_dim"; the whole tensor when it has none)."""
    dim = getattr(param, dim_attr, None)
    if dim is not None:
        size = param.shape[dim]
        loaded_weight = _shard(loaded_weight, dim, tp_rank, size, size * tp_size)
    _copy_checked(param.data, loaded_weight)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: parameter slice {tuple(dst.shape)} vs checkpoint "
                         f"slice {tuple(src.shape)}")
    dst.copy_(src)


def _packed(param: torch.Tensor, dim: int, n: int) -> int:
    """`n` logical features along `dim` in the parameter's stored elements."""
    if getattr(param, "packed_dim", None) != dim:
        return n
    stored = Fraction(n) / Fraction(param.packed_factor)
    if stored.denominator != 1:
        raise ValueError(
            f"{n} features along dim {dim} do not fill whole packed words "
            f"({param.packed_factor} values per element)"
        )
    return int(stored)


def _load_same_for_all_shards(
    layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor
) -> None:
    """The first shard's tensor is copied; every later shard must carry the same values."""
    seen: set[int] = layer.__dict__.setdefault("_shared_tensors_loaded", set())
    if id(param) not in seen:
        _copy_checked(param.data, loaded_weight)
        seen.add(id(param))
        return
    if tuple(param.shape) != tuple(loaded_weight.shape) or not torch.equal(
        param.data, loaded_weight.to(param.device, param.dtype)
    ):
        raise ValueError(
            "the checkpoint's parts of this fused layer disagree on a tensor they must share "
            "(e.g. GPTQ g_idx of q/k/v or gate/up: their act-order permutations differ); "
            "pagedllm cannot fuse them"
        )


def _shard(
    loaded_weight: torch.Tensor, dim: int, index: int, size: int, total: int
) -> torch.Tensor:
    """Slice `index` of `size` along `dim`, checking the checkpoint's full extent is `total`."""
    if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != total:
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded_weight.shape)} "
                         f"should have {total} entries along dim {dim}")
    return loaded_weight.narrow(dim, index * size, size)


class ReplicatedLinear(LinearBase):
    """The full weight on every rank."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(input_size, output_size, params_dtype, linear_method)
        self._create_weights(input_size, [output_size])
        if bias:
            self._create_bias(output_size, None)
        else:
            self.register_parameter("bias", None)
        self._attach_loader()

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        _copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by output columns: rank r holds A[:, r*n/tp:(r+1)*n/tp]."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
        output_sizes: list[int] | None = None,
    ) -> None:
        super().__init__(input_size, output_size, params_dtype, linear_method)
        self.gather_output = gather_output
        self.output_size_per_partition = _divide(output_size, self.tp_size)
        self.output_sizes = output_sizes if output_sizes is not None else [output_size]
        self.output_partition_sizes = self._partition_sizes()
        self._create_weights(input_size, self.output_partition_sizes)
        if bias:
            self._create_bias(self.output_size_per_partition, 0)
        else:
            self.register_parameter("bias", None)
        self._attach_loader()

    def _partition_sizes(self) -> list[int]:
        return [_divide(size, self.tp_size) for size in self.output_sizes]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        _load_rank_shard(param, loaded_weight, "output_dim", self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, output_size_per_partition]
        out = self.linear_method.apply(self, x, self.bias)
        if self.gather_output:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices side by side (e.g. gate and up); shard_id = index."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(
            input_size,
            sum(output_sizes),
            bias=bias,
            gather_output=gather_output,
            params_dtype=params_dtype,
            linear_method=linear_method,
            output_sizes=list(output_sizes),
        )


    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        output_dim = getattr(param, "output_dim", None)
        if shard_id is not None and output_dim is None and getattr(
            param, "same_for_all_shards", False
        ):
            _load_same_for_all_shards(self, param, loaded_weight)
            return
        if shard_id is None or output_dim is None:
            # A pre-merged checkpoint tensor, or a parameter not split by output.
            if output_dim is not None:
                for i, size in enumerate(self.output_sizes):
                    start = _packed(param, output_dim, sum(self.output_sizes[:i]))
                    part = loaded_weight.narrow(output_dim, start, _packed(param, output_dim, size))
                    self.weight_loader(param, part, i)
                return
            _copy_checked(param.data, loaded_weight)
            return
        index = int(shard_id)
        sizes = self.output_partition_sizes
        offset = _packed(param, output_dim, sum(sizes[:index]))
        size = _packed(param, output_dim, sizes[index])
        total = _packed(param, output_dim, self.output_sizes[index])
        _copy_checked(
            param.data.narrow(output_dim, offset, size),
            _shard(loaded_weight, output_dim, self.tp_rank, size, total),
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections split by heads; shard_id is "q", "k" or "v".

    With more ranks than KV heads each KV head is replicated on tp_size / total_num_kv_heads
    ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tensor_model_parallel_world_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        self.q_size, self.kv_size = q_size, kv_size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(
            hidden_size,
            output_size,
            bias=bias,
            gather_output=False,
            params_dtype=params_dtype,
            linear_method=linear_method,
            output_sizes=[q_size * tp_size, kv_size * tp_size, kv_size * tp_size],
        )

    def _partition_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        output_dim = getattr(param, "output_dim", None)
        if shard_id is not None and output_dim is None and getattr(
            param, "same_for_all_shards", False
        ):
            _load_same_for_all_shards(self, param, loaded_weight)
            return
        if output_dim is None:
            _copy_checked(param.data, loaded_weight)
            return
        if shard_id is None:
            # A pre-fused checkpoint tensor: [q; k; v] over all heads.
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            starts = {"q": 0, "k": q_total, "v": q_total + kv_total}
            sizes = {"q": q_total, "k": kv_total, "v": kv_total}
            for sid in ("q", "k", "v"):
                part = loaded_weight.narrow(output_dim, _packed(param, output_dim, starts[sid]),
                                            _packed(param, output_dim, sizes[sid]))
                self.weight_loader(param, part, sid)
            return
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        kv_total = self.total_num_kv_heads * self.head_size
        if shard_id == "q":
            offset, size, index = 0, self.q_size, self.tp_rank
            total = self.total_num_heads * self.head_size
        elif shard_id == "k":
            offset, size, index, total = self.q_size, self.kv_size, kv_rank, kv_total
        elif shard_id == "v":
            offset, size, index = self.q_size + self.kv_size, self.kv_size, kv_rank
            total = kv_total
        else:
            raise ValueError(f"unknown QKV shard id {shard_id!r}")
        offset, size = _packed(param, output_dim, offset), _packed(param, output_dim, size)
        total = _packed(param, output_dim, total)
        _copy_checked(
            param.data.narrow(output_dim, offset, size),
            _shard(loaded_weight, output_dim, index, size, total),
        )


class RowParallelLinear(LinearBase):
    """Y = X A with A split by input rows; partial results are summed over ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(input_size, output_size, params_dtype, linear_method)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = _divide(input_size, self.tp_size)
        self._create_weights(self.input_size_per_partition, [output_size])
        if bias:
            self._create_bias(output_size, None)
        else:
            self.register_parameter("bias", None)
        self._attach_loader()

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        _load_rank_shard(param, loaded_weight, "input_dim", self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank].contiguous()
        # The bias is added once, after the reduction, not once per rank.
        out = self.linear_method.apply(self, x, None)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
