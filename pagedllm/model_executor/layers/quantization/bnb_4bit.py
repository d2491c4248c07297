"""bitsandbytes 4-bit (nf4 / fp4) linear methods and checkpoint tensors; the library's own
kernels do all the arithmetic.

Two ways in, as in vLLM:
- in-flight: `--quantization bitsandbytes` on a 16-bit checkpoint. Each linear layer loads its
  dense weight as usual (any tensor-parallel split); `process_weights_after_loading` quantizes
  this rank's slice with `bitsandbytes.functional.quantize_4bit` (nf4, double quant, blocksize
  64, as vLLM does), a fused qkv / gate_up layer as one matrix.
- pre-quantized: a checkpoint saved by transformers (`quant_method: bitsandbytes`,
  `load_in_4bit`). A quantized module `X` has `X.weight` (packed uint8 [(n*k+1)//2, 1]) and its
  quant state `X.weight.absmax`, `X.weight.quant_map`, with double quant also
  `X.weight.nested_absmax` and `X.weight.nested_quant_map`, and the JSON of the rest in
  `X.weight.quant_state.bitsandbytes__nf4|fp4`. These have no parameter to land in: the config
  takes them out of the checkpoint stream (`intercept_weights`) and each layer rebuilds one
  `QuantState` per checkpoint module with `QuantState.from_dict` (fused q/k/v and gate/up keep
  one state per shard and one matmul each).

The matmul is `bitsandbytes.matmul_4bit` in the activation (model) dtype, on CUDA and CPU;
`bnb_4bit_compute_dtype` is not used (vLLM computes in the model dtype too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import (
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    UnquantizedLinearMethod,
)
from pagedllm.model_executor.layers.quantization.base_config import checkpoint_module_names
from pagedllm.model_executor.loader.errors import ModelLoadError

if TYPE_CHECKING:
    from pagedllm.model_executor.layers.quantization.bitsandbytes import BitsAndBytesConfig

QUANT_TYPES = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
# The only nested (double-quant) block size bitsandbytes' matmul supports.
NESTED_BLOCKSIZE = 256
_QS_PREFIX = "quant_state."
# Tensors a 4-bit module stores beside `weight`, after "weight.".
_SIDE_NAMES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class _DropKernelsHubNotice(logging.Filter):
    """On AVX512-BF16 CPUs bitsandbytes warns at import that it cannot fetch an optional kernel
    from a model hub; pagedllm never uses that kernel (nor reaches a hub at run time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_KERNELS_NOTICE_FILTER = _DropKernelsHubNotice()


def import_bnb() -> Any:
    """The bitsandbytes package; ValueError with the install hint when it is missing."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KERNELS_NOTICE_FILTER)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.utils  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "bitsandbytes quantization needs the bitsandbytes package "
            f"(pip install 'pagedllm[bnb]'): {e}"
        ) from e
    return bitsandbytes


@dataclass(slots=True)
class Packed4bit:
    """One 4-bit matrix [out_features, in_features] and its bitsandbytes quant state."""

    qweight: torch.Tensor  # uint8 [(out_features * in_features + 1) // 2, 1]
    state: Any  # bitsandbytes.functional.QuantState, shape [out_features, in_features]
    out_features: int


def apply_4bit(
    parts: list[Packed4bit], x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """[num_tokens, in_features] -> [num_tokens, sum(out_features)] through matmul_4bit, one
    call per part, in x's dtype."""
    bnb = import_bnb()
    if len(parts) == 1:
        return bnb.matmul_4bit(x, parts[0].qweight, parts[0].state, bias=bias)
    out = torch.cat([bnb.matmul_4bit(x, p.qweight, p.state) for p in parts], dim=-1)
    return out if bias is None else out + bias


class BitsAndBytesInflightMethod(UnquantizedLinearMethod):
    """A 16-bit checkpoint quantized to 4 bits once loaded: the dense weight and its loaders
    are the unquantized method's until `process_weights_after_loading`."""

    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        F = import_bnb().functional
        weight = layer.weight.data  # [output_size_per_partition, input_size_per_partition]
        qweight, state = F.quantize_4bit(
            weight.contiguous(),
            blocksize=self.config.blocksize,
            compress_statistics=self.config.double_quant,
            quant_type=self.config.quant_type,
            quant_storage=torch.uint8,
        )
        del layer.weight
        layer.bnb_parts = [Packed4bit(qweight, state, weight.shape[0])]

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return apply_4bit(layer.bnb_parts, x, bias)


class BitsAndBytesPrequantizedMethod(LinearMethod):
    """A layer whose 4-bit tensors come from a bitsandbytes checkpoint.

    Registers no tensors: the packed weights and quant states arrive by checkpoint name through
    the config's `intercept_weights`, and become `layer.bnb_parts` once all are in. One
    instance per layer (it remembers the layer's name and shapes).
    """

    def __init__(self, config: BitsAndBytesConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        self.in_features = 0
        self.out_sizes: list[int] = []

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        self.in_features = input_size_per_partition
        self.out_sizes = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        names = checkpoint_module_names(self.prefix)
        if len(names) == len(self.out_sizes):
            sizes = self.out_sizes
        elif len(names) == 1:
            sizes = [sum(self.out_sizes)]  # a fused tensor in the checkpoint itself
        else:
            raise ModelLoadError(
                f"bitsandbytes checkpoint: layer {self.prefix} has {len(self.out_sizes)} "
                f"output parts but stands for {len(names)} checkpoint modules ({names})"
            )
        tensors = self.config.checkpoint_tensors
        if layer.tp_size == 1:
            layer.bnb_parts = [tensors.take(name, (size, self.in_features))
                               for name, size in zip(names, sizes)]
            return
        full = [tensors.take(name, (None, layer.input_size)) for name in names]
        layer.bnb_parts = [shard_for_rank(layer, self.prefix, full, self.in_features,
                                          sum(self.out_sizes), tensors.device)]

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return apply_4bit(layer.bnb_parts, x, bias)


class CheckpointTensors:
    """The 4-bit tensors of a pre-quantized checkpoint, by checkpoint module name, held from
    the checkpoint stream until their layer turns them into `Packed4bit`s."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.device = torch.device("cpu")  # where the layers compute
        # Under tensor parallelism every rank reads whole matrices and keeps a slice: they
        # wait on the host, so that no device ever holds the full model.
        self.hold_on_host = False
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def hold_device(self) -> torch.device:
        return torch.device("cpu") if self.hold_on_host else self.device

    def add_module(self, name: str) -> None:
        self.modules.add(name)

    def _module_of(self, name: str) -> str | None:
        if name in self.modules:
            return name
        # Checkpoints of the bare model name layers without the "model." prefix.
        if "model." + name in self.modules:
            return "model." + name
        return None

    def intercept(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Keeps the quantized modules' tensors and passes every other one on."""
        for name, tensor in weights:
            split = split_bnb_name(name)
            if split is None:
                yield name, tensor
                continue
            module, key = split
            ours = self._module_of(module)
            if ours is None:
                if key != "weight":
                    raise ModelLoadError(
                        f"bitsandbytes checkpoint: tensor {name} is quantized, but pagedllm "
                        f"keeps {module} unquantized (it is in llm_int8_skip_modules or is not "
                        "a linear layer)"
                    )
                yield name, tensor
                continue
            # The quant-state JSON is read on the host; everything else goes to the device now.
            on_host = key.startswith("weight." + _QS_PREFIX)
            keep = tensor if on_host else tensor.to(self.hold_device)
            self._tensors.setdefault(ours, {})[key] = keep

    def take(self, module: str, shape: tuple[int | None, int]) -> Packed4bit:
        """The checked 4-bit matrix of checkpoint `module`, expected to be [n, k] = `shape`
        (n None: any); ModelLoadError naming the tensor that is missing or wrong."""
        entries = self._tensors.pop(module, {})
        weight = entries.pop("weight", None)
        if weight is None:
            raise ModelLoadError(f"bitsandbytes checkpoint lacks tensor {module}.weight")
        qs_keys = [k for k in entries if k.startswith("weight." + _QS_PREFIX)]
        if not qs_keys:
            raise ModelLoadError(
                f"bitsandbytes checkpoint: {module}.weight has no quant state "
                f"({module}.weight.quant_state.bitsandbytes__nf4 or __fp4); is it a 4-bit "
                "bitsandbytes tensor? Modules left in 16 bits belong in llm_int8_skip_modules"
            )
        qs_name = f"{module}.{qs_keys[0]}"
        meta = _read_quant_state_json(qs_name, entries[qs_keys[0]])
        needed = ["absmax", "quant_map"]
        if "nested_offset" in meta:
            needed += ["nested_absmax", "nested_quant_map"]
        qs_dict: dict[str, Any] = {k: entries[k] for k in qs_keys}
        for side in needed:
            tensor = entries.get("weight." + side)
            if tensor is None:
                raise ModelLoadError(
                    f"bitsandbytes checkpoint lacks tensor {module}.weight.{side} (needed by "
                    f"{qs_name})"
                )
            qs_dict[side] = tensor
        try:
            state = import_bnb().functional.QuantState.from_dict(dict(qs_dict),
                                                                 device=self.hold_device)
        except (ValueError, KeyError, AssertionError, AttributeError, TypeError) as e:
            raise ModelLoadError(f"bitsandbytes checkpoint: bad quant state {qs_name}: {e}") from e
        _check_state(module, state, weight, shape)
        return Packed4bit(weight.view(torch.uint8).reshape(-1, 1), state, state.shape[0])


def split_bnb_name(name: str) -> tuple[str, str] | None:
    """`X.weight` -> (X, "weight"); `X.weight.absmax` -> (X, "weight.absmax"); likewise every
    bitsandbytes 4-bit side tensor; None for any other name."""
    if name.endswith(".weight"):
        return name[: -len(".weight")], "weight"
    for side in (*_SIDE_NAMES, _QS_PREFIX):
        marker = ".weight." + side
        idx = name.rfind(marker)
        if idx > 0 and (name.endswith(marker) or side == _QS_PREFIX):
            return name[:idx], name[idx + 1:]
    return None


def _read_quant_state_json(qs_name: str, tensor: torch.Tensor) -> dict[str, Any]:
    try:
        meta = import_bnb().utils.unpack_tensor_to_dict(tensor)
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise ModelLoadError(f"bitsandbytes checkpoint: {qs_name} is not a quant state: {e}") from e
    if not isinstance(meta, dict):
        raise ModelLoadError(f"bitsandbytes checkpoint: {qs_name} is not a quant state")
    return meta


def _check_state(
    module: str, state: Any, weight: torch.Tensor, expected: tuple[int | None, int]
) -> None:
    """Refuses a quant state that does not describe the packed `weight` of an [n, k] layer."""
    prefix = f"bitsandbytes checkpoint: {module}.weight"
    if state.quant_type not in QUANT_TYPES:
        raise ModelLoadError(f"{prefix}: quant type {state.quant_type!r} is not nf4 or fp4")
    shape = (state.shape[0] if state.shape and expected[0] is None else expected[0],
             expected[1])
    if state.shape is None or tuple(state.shape) != tuple(shape):
        raise ModelLoadError(
            f"{prefix}: its quant state says shape {list(state.shape or [])}, the model "
            f"expects {list(shape)}"
        )
    numel = shape[0] * shape[1]
    nbytes = weight.numel() * weight.element_size()
    if nbytes != (numel + 1) // 2:
        raise ModelLoadError(
            f"{prefix}: {nbytes} bytes, a packed 4-bit [{shape[0]}, {shape[1]}] needs "
            f"{(numel + 1) // 2}"
        )
    blocks = math.ceil(numel / state.blocksize)
    if state.absmax.numel() != blocks:
        raise ModelLoadError(
            f"{prefix}.absmax: {state.absmax.numel()} entries, blocksize {state.blocksize} "
            f"needs {blocks}"
        )
    if state.nested:
        if state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ModelLoadError(
                f"{prefix}.nested_absmax: nested block size {state.state2.blocksize} is not "
                f"supported (bitsandbytes' matmul needs {NESTED_BLOCKSIZE})"
            )
        nested = math.ceil(blocks / state.state2.blocksize)
        if state.state2.absmax.numel() != nested:
            raise ModelLoadError(
                f"{prefix}.nested_absmax: {state.state2.absmax.numel()} entries, "
                f"{nested} needed"
            )


def _shard_ids(layer: nn.Module, num_modules: int) -> list[Any]:
    """The layer loader's shard id of each checkpoint module the layer fuses."""
    if num_modules == 1:
        return [None]
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(num_modules))
    raise ModelLoadError(f"bitsandbytes checkpoint: cannot shard {type(layer).__name__}")


def shard_for_rank(
    layer: nn.Module, prefix: str, full: list[Packed4bit], in_features: int, out_features: int,
    device: torch.device,
) -> Packed4bit:
    """This rank's [out_features, in_features] slice of a layer's full checkpoint matrices, as
    one 4-bit matrix. Rows of the packed weight ([n, k/2] bytes) and of the absmax
    ([n, k/blocksize]) are output features, so the layer's own loader cuts them like a dense
    weight (heads, KV replicas, input splits) once every block lies within one row of this
    rank's slice. Double-quant absmax is dequantized to float32 first (its nested blocks and
    offset span the whole tensor)."""
    F = import_bnb().functional
    first = full[0].state
    k = first.shape[1]
    bs = first.blocksize
    for part in full:
        st = part.state
        if (st.quant_type, st.blocksize, st.dtype) != (first.quant_type, bs, first.dtype) or \
                not torch.equal(st.code, first.code):
            raise ModelLoadError(f"bitsandbytes checkpoint: the modules of {prefix} differ in "
                                 "quant type or block size; they cannot be sharded as one")
    if k % bs or in_features % bs:
        raise ModelLoadError(
            f"bitsandbytes checkpoint: {prefix} has {in_features} of {k} input features on "
            f"this rank, not a multiple of the block size {bs}; use a smaller "
            "--tensor-parallel-size"
        )
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(out_features, in_features // bs, dtype=torch.float32, device=device)
    for dst in (packed, absmax):
        dst.output_dim, dst.input_dim = 0, 1
    for sid, part in zip(_shard_ids(layer, len(full)), full):
        st, n = part.state, part.state.shape[0]
        scales = st.absmax
        if st.nested:
            scales = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).float()
        for dst, src in ((packed, part.qweight.view(n, k // 2)),
                         (absmax, scales.view(n, k // bs))):
            if sid is None:
                layer.weight_loader(dst, src)
            else:
                layer.weight_loader(dst, src, sid)
    state = F.QuantState(
        absmax=absmax.reshape(-1), shape=torch.Size([out_features, in_features]),
        code=first.code.to(device), blocksize=bs, quant_type=first.quant_type, dtype=first.dtype,
    )
    return Packed4bit(packed.reshape(-1, 1), state, out_features)
