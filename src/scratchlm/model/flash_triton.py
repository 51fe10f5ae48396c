"""FlashAttention-2 in Triton, forward and backward, with ALiBi and grouped key/value heads.

Attention is softmax(Q K^T * scale + bias) V. Written out, the (T, T) score matrix per head is what costs
memory and bandwidth; here it never exists. Each program owns a block of query rows and walks the key
blocks once, keeping a running row maximum m, a running normaliser l and an unnormalised output, which it
rescales whenever the maximum grows (the online softmax). Only the output and one number per row, the
log-sum-exp, go back to memory.

The backward pass recomputes the probabilities block by block from that log-sum-exp instead of storing
them. With D = rowsum(dO * O) computed first, dS = P * (dP - D) where dP = dO V^T, then dQ = dS K * scale,
dK = dS^T Q * scale, dV = P^T dO. Two kernels share the work without atomics, so the result is
deterministic: one walks key blocks (dK, dV, over every query head that reads that key head), the other
walks query blocks (dQ).

Causal masking is bottom-right aligned (query i sits at key position i + Tk - Tq), so a block of queries
only visits key blocks up to its diagonal; blocks wholly visible skip the mask arithmetic.

Triton is imported here and only here, and this module only when `model.attention = "triton"`: Triton is
Linux and GPU only in practice and is not a dependency of scratchlm. `TRITON_INTERPRET=1` (set before
this module is imported) runs the same kernels on CPU tensors through Triton's interpreter, which is how
the tests check them.
"""
from __future__ import annotations

import math
import os
import sys

import torch

from scratchlm.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.dot wants power-of-two tiles of at least 16
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_config(head_dim: int, dropout: float = 0.0) -> None:
    """Raise a one-line UserError when the kernel cannot compute this model on any machine."""
    if head_dim not in HEAD_DIMS:
        raise UserError(f"model.attention = 'triton' supports head sizes {', '.join(map(str, HEAD_DIMS))}; "
                        f"d_model / n_heads = {head_dim}")
    if dropout:
        raise UserError("model.attention = 'triton' has no attention dropout; set model.dropout = 0 or use sdpa")


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on this machine's tensors of `device`."""
    return triton is not None and (device.type == "cuda" or interpreting())


def require_usable(cfg, device: torch.device | str) -> None:
    """For training, where the kernel was asked for: raise a one-line UserError when it cannot run on
    `device` here. (Inference does not ask: the model falls back to SDPA, see `fallback_notice`.)"""
    if cfg.attention != "triton":
        return
    if triton is None:
        raise UserError("model.attention = 'triton' needs the triton package to train "
                        "(pip install triton; Linux with a CUDA GPU), or set model.attention = sdpa")
    if not runs_on(torch.device(device)):
        raise UserError(f"model.attention = 'triton' trains on a CUDA GPU, not on {torch.device(device)}; "
                        "set model.attention = sdpa (TRITON_INTERPRET=1 runs the kernel, very slowly, on the CPU)")


_noticed = False


def fallback_notice(device: torch.device) -> None:
    """Say once per process that SDPA stands in for the kernel: the results are the same up to rounding,
    so a model trained on a GPU can still be sampled, evaluated and converted on a CPU."""
    global _noticed
    if not _noticed:
        _noticed = True
        why = "the triton package is not installed" if triton is None else f"it does not run on {device}"
        print(f"note: model.attention = 'triton' but {why}; using PyTorch's SDPA attention instead",
              file=sys.stderr, flush=True)


if triton is not None:

    @triton.jit
    def _fwd_step(q, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk, m_i, l_i, acc, cols, dims,
                  CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        keys = n0 + cols
        if MASKED:
            inside = keys[:, None] < Tk
            k = tl.load(k_base + keys[:, None] * s_kn + dims[None, :], mask=inside, other=0.0)
            v = tl.load(v_base + keys[:, None] * s_vn + dims[None, :], mask=inside, other=0.0)
        else:
            k = tl.load(k_base + keys[:, None] * s_kn + dims[None, :])
            v = tl.load(v_base + keys[:, None] * s_vn + dims[None, :])
        # Scores are kept in base 2 (scaled by log2 e) so that exp2, a single instruction, does the softmax.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if ALIBI:
            s += slope * (keys[None, :] - q_pos[:, None]).to(tl.float32)
        if MASKED:
            visible = keys[None, :] < Tk
            if CAUSAL:
                visible = visible & (keys[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        # Every row sees key 0 in the first block it visits, so m_new is finite from then on and
        # exp2(m_i - m_new) never meets -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, SLOPES, qk_scale,
                    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
                    H, GROUP, Tq, Tk, T_BUCKET,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # 64-bit offsets: batch * head * position * dim passes 2^31 at long contexts.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUP  # GQA: the query head reads its group's key/value head in place
        offset = Tk - Tq
        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :], mask=rows[:, None] < Tq, other=0.0)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h)
        q_pos = rows + offset
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if CAUSAL:
            # Keys up to m0 + offset are visible to every row of the block: whole blocks of them need no
            # mask. Past the last row's diagonal nothing is visible, so the walk stops there.
            n_full = (m0 + offset + 1) // BLOCK_N * BLOCK_N
            n_end = tl.minimum(Tk, m0 + BLOCK_M + offset)
        else:
            n_full = Tk // BLOCK_N * BLOCK_N
            n_end = Tk
        for n0 in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk, m_i, l_i, acc,
                                      cols, dims, CAUSAL, ALIBI, False, PRECISION)
        for n0 in range(n_full, n_end, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk, m_i, l_i, acc,
                                      cols, dims, CAUSAL, ALIBI, True, PRECISION)
        out = acc / l_i[:, None]
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + dims[None, :], out.to(O.dtype.element_ty),
                 mask=rows[:, None] < Tq)
        # Base-2 log-sum-exp of the base-2 scores: exactly what the backward subtracts before exp2.
        tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, m_i + tl.log2(l_i), mask=rows < Tq)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, H, Tq,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        inside = rows[:, None] < Tq
        o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_om + dims[None, :], mask=inside, other=0.0)
        do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dm + dims[None, :], mask=inside, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)

    @triton.jit
    def _bwd_kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, s_qm, s_dom, m0, keys, offset, slope,
                     qk_scale, Tq, rows_local, dims,
                     ALIBI: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        rows = m0 + rows_local
        inside = rows < Tq
        q = tl.load(q_base + rows[:, None] * s_qm + dims[None, :], mask=inside[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * s_dom + dims[None, :], mask=inside[:, None], other=0.0)
        # Rows past the end get lse = +inf, so their probabilities are exactly 0 and add nothing to dK, dV.
        lse = tl.load(lse_base + rows, mask=inside, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=inside, other=0.0)
        # Transposed tiles (keys down, queries across) so dK and dV come out without transposing back.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        q_pos = rows + offset
        if ALIBI:
            s_t += slope * (keys[:, None] - q_pos[None, :]).to(tl.float32)
        if MASKED:
            s_t = tl.where(keys[:, None] <= q_pos[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, qk_scale, sm_scale,
                       s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_dom,
                       s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                       H, GROUP, Tq, Tk, T_BUCKET,
                       HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bhk = tl.program_id(1)
        n_kv = H // GROUP
        b = (pid_bhk // n_kv).to(tl.int64)
        hk = (pid_bhk % n_kv).to(tl.int64)
        offset = Tk - Tq
        n0 = pid_n * BLOCK_N
        keys = n0 + tl.arange(0, BLOCK_N)
        rows_local = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        inside = keys[:, None] < Tk
        # Keys past Tk load as zeros; the rows of dK, dV they produce are never stored, and each row of dK
        # and dV depends only on its own key, so they cannot leak into real rows.
        k = tl.load(K + b * s_kb + hk * s_kh + keys[:, None] * s_kn + dims[None, :], mask=inside, other=0.0)
        v = tl.load(V + b * s_vb + hk * s_vh + keys[:, None] * s_vn + dims[None, :], mask=inside, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        if CAUSAL:
            # Query rows before n0 - offset see none of these keys: skipped. From m_full on, every row sees
            # every key of the block: no mask. In between, the diagonal band is masked.
            m_start = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
            m_full = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Tq)
        else:
            m_start = 0
            m_full = 0
        # Each program sums over all query heads that share this key/value head, so GQA needs neither
        # repeated K/V in memory nor atomic adds into dK, dV.
        for g in range(GROUP):
            h = hk * GROUP + g
            slope = 0.0
            if ALIBI:
                slope = tl.load(SLOPES + h)
            q_base = Q + b * s_qb + h * s_qh
            do_base = DO + b * s_dob + h * s_doh
            lse_base = LSE + (b * H + h) * Tq
            delta_base = DELTA + (b * H + h) * Tq
            for m0 in range(m_start, m_full, BLOCK_M):
                dk, dv = _bwd_kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, s_qm, s_dom, m0, keys,
                                      offset, slope, qk_scale, Tq, rows_local, dims, ALIBI, True, PRECISION)
            for m0 in range(m_full, Tq, BLOCK_M):
                dk, dv = _bwd_kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, s_qm, s_dom, m0, keys,
                                      offset, slope, qk_scale, Tq, rows_local, dims, ALIBI, False, PRECISION)
        dk *= sm_scale
        tl.store(DK + b * s_dkb + hk * s_dkh + keys[:, None] * s_dkn + dims[None, :], dk.to(DK.dtype.element_ty),
                 mask=inside)
        tl.store(DV + b * s_dvb + hk * s_dvh + keys[:, None] * s_dvn + dims[None, :], dv.to(DV.dtype.element_ty),
                 mask=inside)

    @triton.jit
    def _bwd_q_step(q, do, lse, delta, dq, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk, cols, dims,
                    CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        keys = n0 + cols
        if MASKED:
            inside = keys[:, None] < Tk
            k = tl.load(k_base + keys[:, None] * s_kn + dims[None, :], mask=inside, other=0.0)
            v = tl.load(v_base + keys[:, None] * s_vn + dims[None, :], mask=inside, other=0.0)
        else:
            k = tl.load(k_base + keys[:, None] * s_kn + dims[None, :])
            v = tl.load(v_base + keys[:, None] * s_vn + dims[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if ALIBI:
            s += slope * (keys[None, :] - q_pos[:, None]).to(tl.float32)
        if MASKED:
            visible = keys[None, :] < Tk
            if CAUSAL:
                visible = visible & (keys[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _bwd_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, SLOPES, qk_scale, sm_scale,
                      s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_dom,
                      s_dqb, s_dqh, s_dqm,
                      H, GROUP, Tq, Tk, T_BUCKET,
                      HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUP
        offset = Tk - Tq
        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        inside = rows < Tq
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :], mask=inside[:, None], other=0.0)
        do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_dom + dims[None, :], mask=inside[:, None],
                     other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=inside, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=inside, other=0.0)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h)
        q_pos = rows + offset
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if CAUSAL:
            n_full = (m0 + offset + 1) // BLOCK_N * BLOCK_N
            n_end = tl.minimum(Tk, m0 + BLOCK_M + offset)
        else:
            n_full = Tk // BLOCK_N * BLOCK_N
            n_end = Tk
        for n0 in range(0, n_full, BLOCK_N):
            dq = _bwd_q_step(q, do, lse, delta, dq, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk,
                             cols, dims, CAUSAL, ALIBI, False, PRECISION)
        for n0 in range(n_full, n_end, BLOCK_N):
            dq = _bwd_q_step(q, do, lse, delta, dq, k_base, v_base, s_kn, s_vn, n0, q_pos, slope, qk_scale, Tk,
                             cols, dims, CAUSAL, ALIBI, True, PRECISION)
        dq *= sm_scale
        tl.store(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqm + dims[None, :], dq.to(DQ.dtype.element_ty),
                 mask=inside[:, None])

    def _configs(outer: str, inner: str, pairs) -> list:
        return [triton.Config({outer: o, inner: i}, num_warps=w, num_stages=s) for o, i, w, s in pairs]

    # Candidates for the GPU autotuner: 128-row tiles with 4-8 warps suit H100-class cards at head size
    # 64-128; the smaller ones are there for cards with less shared memory (configs that do not fit are
    # dropped by the autotuner).
    # Tuned once per power-of-two length (T_BUCKET, otherwise unused), not once per exact length.
    _KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "ALIBI"]
    _fwd_tuned = triton.autotune(_configs("BLOCK_M", "BLOCK_N", [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
    ]), key=_KEY)(_fwd_kernel)
    # The dK/dV kernel holds two accumulators: with 4 warps it spills registers at head size 128 on sm_90
    # (checked with ptxas), hence mostly 8-warp candidates.
    _bwd_kv_tuned = triton.autotune(_configs("BLOCK_N", "BLOCK_M", [
        (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3),
    ]), key=_KEY)(_bwd_kv_kernel)
    _bwd_q_tuned = triton.autotune(_configs("BLOCK_M", "BLOCK_N", [
        (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
    ]), key=_KEY)(_bwd_q_kernel)


def _precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's own switch for matmuls; 16-bit inputs go to the tensor cores as they are.
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(kernel, tuned, grid_fn, blocks, *args, **constexprs):
    """Fixed tiles when asked for (tests, the interpreter), the autotuner otherwise."""
    if blocks is not None:
        kernel[grid_fn(blocks)](*args, **constexprs, **blocks)
    else:
        tuned[lambda meta: grid_fn(meta)](*args, **constexprs)


def _forward(q, k, v, slopes, causal, scale, blocks):
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    # (B, T, H, D) memory seen as (B, H, T, D): the model's transpose back and reshape then cost nothing.
    o = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    fwd_blocks = None if blocks is None else {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
    _launch(_fwd_kernel, None if blocks else _fwd_tuned, lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * H), fwd_blocks,
            q, k, v, o, lse, slopes if slopes is not None else q, scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, H // Hk, Tq, Tk, triton.next_power_of_2(Tk),
            HEAD_DIM=D, CAUSAL=causal, ALIBI=slopes is not None, PRECISION=_precision(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse, slopes, causal, scale, blocks):
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    rows = blocks[0] if blocks else 64
    _bwd_delta_kernel[(triton.cdiv(Tq, rows), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
                                                        HEAD_DIM=D, BLOCK_M=rows)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(HEAD_DIM=D, CAUSAL=causal, ALIBI=slopes is not None, PRECISION=_precision(q.dtype))
    slopes_arg = slopes if slopes is not None else q
    tiles = None if blocks is None else {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
    _launch(_bwd_kv_kernel, None if blocks else _bwd_kv_tuned, lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * Hk), tiles,
            q, k, v, do, lse, delta, dk, dv, slopes_arg, scale * LOG2E, scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            H, H // Hk, Tq, Tk, triton.next_power_of_2(Tk), **common)
    _launch(_bwd_q_kernel, None if blocks else _bwd_q_tuned, lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * H), tiles,
            q, k, v, do, lse, delta, dq, slopes_arg, scale * LOG2E, scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            H, H // Hk, Tq, Tk, triton.next_power_of_2(Tk), **common)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, causal, scale, blocks):
        o, lse = _forward(q, k, v, slopes, causal, scale, blocks)
        ctx.save_for_backward(q, k, v, o, lse, slopes)
        ctx.mark_non_differentiable(lse)
        ctx.causal, ctx.scale, ctx.blocks = causal, scale, blocks
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, slopes = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, slopes, ctx.causal, ctx.scale, ctx.blocks)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    alibi_slopes: torch.Tensor | None = None, scale: float | None = None,
                    block_sizes: tuple[int, int] | None = None, return_lse: bool = False):
    """softmax(q k^T * scale + alibi) v for q (B, H, Tq, D) and k, v (B, H_kv, Tk, D), H a multiple of H_kv.

    ALiBi adds slope[h] * (key position - query position) to the scores (slopes as in `positions.py`).
    Causal masking is aligned to the end: query i sits at position i + Tk - Tq. `block_sizes` (rows, keys)
    fixes the tiles instead of autotuning them. With `return_lse`, also the natural log-sum-exp of each
    score row (B, H, Tq), float32 (not differentiable).
    """
    if triton is None:
        raise UserError("the triton attention kernel needs the triton package (pip install triton)")
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if k.shape != (B, Hk, Tk, D) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % Hk:
        raise ValueError(f"{H} query heads are not a multiple of {Hk} key/value heads")
    if D not in HEAD_DIMS:
        raise ValueError(f"head size {D} is not one of {HEAD_DIMS}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention with more queries ({Tq}) than keys ({Tk}) leaves rows with nothing to see")
    if not interpreting() and not q.is_cuda:
        raise ValueError("the triton attention kernel runs on CUDA tensors (or on CPU ones under TRITON_INTERPRET=1)")
    # Mixed dtypes (say a float32 qk-norm under autocast) are cast here, where autograd sees the cast.
    k, v = k.to(q.dtype), v.to(q.dtype)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if alibi_slopes is not None:
        # Pre-multiplied by log2 e: the kernels work with base-2 scores.
        alibi_slopes = (alibi_slopes.to(device=q.device, dtype=torch.float32) * LOG2E).contiguous()
        if alibi_slopes.shape != (H,):
            raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}; expected ({H},)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if block_sizes is None and interpreting():
        block_sizes = (16, 16)  # the autotuner times kernels on a GPU; the interpreter has none
    o, lse2 = FlashAttention.apply(q, k, v, alibi_slopes, causal, scale, block_sizes)
    if return_lse:
        return o, lse2.detach() / LOG2E
    return o
