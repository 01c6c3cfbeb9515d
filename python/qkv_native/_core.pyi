"""Type stubs for the private native module (use the qkv_native package instead)."""

from typing import Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

class PackedWeight:
    def __init__(self, w: F32, trans: bool = ...) -> None: ...
    @property
    def shape(self) -> Tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...
    def to_array(self) -> F32: ...

def pack_weights(ws: list, trans: bool = ...) -> list: ...
def matmul(
    a: F32,
    b: Union[F32, PackedWeight],
    trans_a: bool = ...,
    trans_b: bool = ...,
    alpha: float = ...,
    beta: float = ...,
    out: Optional[F32] = ...,
) -> F32: ...
def qkv_project(
    x: F32,
    w_q: F32,
    w_k: F32,
    w_v: F32,
    b_q: Optional[F32] = ...,
    b_k: Optional[F32] = ...,
    b_v: Optional[F32] = ...,
    *,
    num_heads: int,
    num_kv_heads: int,
    q_out: Optional[F32] = ...,
    k_out: Optional[F32] = ...,
    v_out: Optional[F32] = ...,
) -> Tuple[F32, F32, F32]: ...
def qkv_project_packed(
    x: F32,
    w_qkv: PackedWeight,
    b_qkv: Optional[F32] = ...,
    *,
    num_heads: int,
    num_kv_heads: int,
    q_out: Optional[F32] = ...,
    k_out: Optional[F32] = ...,
    v_out: Optional[F32] = ...,
) -> Tuple[F32, F32, F32]: ...
def qkv_project_backward(
    x: F32,
    w_q: F32,
    w_k: F32,
    w_v: F32,
    dq: F32,
    dk: F32,
    dv: F32,
    num_heads: int,
    num_kv_heads: int,
    need_dx: bool = ...,
    need_dw: bool = ...,
    need_db: bool = ...,
) -> Tuple[Optional[F32], ...]: ...
def attention(
    q: F32,
    k: F32,
    v: F32,
    causal: bool = ...,
    key_lengths: Optional[npt.NDArray[np.integer]] = ...,
    bias: Optional[F32] = ...,
    scale: float = ...,
    return_lse: bool = ...,
    out: Optional[F32] = ...,
) -> Union[F32, Tuple[F32, F32]]: ...
def attention_backward(
    do: F32,
    q: F32,
    k: F32,
    v: F32,
    o: F32,
    lse: F32,
    causal: bool = ...,
    key_lengths: Optional[npt.NDArray[np.integer]] = ...,
    bias: Optional[F32] = ...,
    scale: float = ...,
) -> Tuple[F32, F32, F32]: ...
def softmax_cross_entropy(
    logits: F32, targets: np.ndarray, ignore_index: int, label_smoothing: float, out: Optional[F32] = ...
) -> Tuple[float, F32]: ...
def dropout(x: F32, seed: int, threshold: int, scale: float) -> Tuple[F32, F32]: ...
def adam_update(
    w: F32, g: F32, m: F32, v: F32, offsets: np.ndarray, decay: np.ndarray, beta1: float, one_minus_beta1: float,
    beta2: float, one_minus_beta2: float, bias2_sqrt: float, eps: float, step_size: float, decay_mul: float, l2: float,
) -> None: ...
def sgd_update(
    w: F32, g: F32, buf: Optional[F32], offsets: np.ndarray, decay: np.ndarray, wd: float, momentum: float,
    one_minus_dampening: float, lr: float, first: bool, nesterov: bool,
) -> None: ...
def cpu_info() -> dict: ...
MAX_THREADS: int
def set_num_threads(n: int) -> None: ...
def set_cache_limit(nbytes: int) -> int: ...
def cache_info() -> dict: ...
def get_num_threads() -> int: ...
def set_isa(isa: str) -> None: ...
def get_isa() -> str: ...
def supported_isas() -> list[str]: ...
def exp(x: F32) -> F32: ...
def fma_probe(seconds: float = ...) -> float: ...
