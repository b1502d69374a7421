"""Triton kernels for the ToMeMerge and TopKSelect plugins.

One kernel per op and one program per batch item (a TensorRT AOT plugin launches exactly one kernel and gets no
scratch memory), with every shape and setting a compile-time constant (the exported graphs are static). Argument
order follows TensorRT's AOT plugin convention: input pointers, then the int32 scalars, then output pointers.
Scores, selection and weighted sums are fp32 whatever the input dtype; fp32 divisions are IEEE (``div_rn``) so the
padding scores match PyTorch's bit for bit and ties break the same way.

Selection is by counting rather than sorting: an element's rank is the number of elements ahead of it
(higher score, or equal score and lower index), which is PyTorch's stable descending order, deterministic and
free of data-dependent control flow.

Importing this module imports Triton; ``launch`` imports it lazily.
"""

from __future__ import annotations

import triton
import triton.language as tl

WEIGHT_FLOOR: tl.constexpr = tl.constexpr(1e-12)  # as tc_export.ops.rows.WEIGHT_FLOOR
COSINE_CAP: tl.constexpr = tl.constexpr(1.0 - 2.0**-16)  # as tc_export.ops.rows.COSINE_CAP


@triton.jit
def tome_merge_kernel(
    x_ptr,
    size_ptr,
    metric_ptr,
    batch,
    x_out_ptr,
    size_out_ptr,
    N: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    PROTECTED: tl.constexpr,
    PADDED: tl.constexpr,
    S: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ToMe bipartite soft matching + size-weighted merge of one batch item; R is the effective r (0: copy).

    The token state has S columns (``tc_export.ops.state``): the size, then positions times size when carried;
    every column is copied or summed like the size, and only the size (column 0) weighs the merge.

    The per-A-row values (best score, its column, rank) are register vectors of BLOCK_A (all the A rows); every
    2-D tile is (BLOCK_A, BLOCK_J): BLOCK_J B columns when scoring, BLOCK_J A rows when ranking (a tile of another
    vector's entries is picked out by a masked max), BLOCK_J channels when copying the unmerged A rows. The merge
    into B works on (BLOCK_B, BLOCK_C) tiles."""
    NA: tl.constexpr = (N + 1) // 2
    NB: tl.constexpr = N // 2
    N_OUT: tl.constexpr = N - R
    b = tl.program_id(0).to(tl.int64)
    live = b < batch
    x_in = x_ptr + b * (N * C)
    x_out = x_out_ptr + b * (N_OUT * C)
    s_in = size_ptr + b * (N * S)
    s_out = size_out_ptr + b * (N_OUT * S)
    m_in = metric_ptr + b * (N * D)

    ia = tl.arange(0, BLOCK_A)
    a_ok = (ia < NA) & live
    size_a = tl.load(s_in + (2 * ia) * S, mask=a_ok, other=1.0).to(tl.float32)
    pad_a = size_a == 0.0
    prot_a = (2 * ia) < PROTECTED
    norm_a = _row_norms(m_in, 2 * ia, a_ok, D)

    # Best B column per A row (max cosine, ties -> lowest column), over blocks of BLOCK_J columns. The dot
    # products run over d in a loop of rank-1 updates, reading metric columns (no tl.dot: fp32 dot tiles unroll
    # into huge code and need shared memory).
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_A], tl.int32)
    for j0 in range(0, NB, BLOCK_J):
        jb = j0 + tl.arange(0, BLOCK_J)
        j_ok = (jb < NB) & live
        norm_b = _row_norms(m_in, 2 * jb + 1, j_ok, D)
        scores = tl.zeros([BLOCK_A, BLOCK_J], tl.float32)
        for d in range(D):
            col_a = tl.load(m_in + (2 * ia) * D + d, mask=a_ok, other=0.0).to(tl.float32)
            col_b = tl.load(m_in + (2 * jb + 1) * D + d, mask=j_ok, other=0.0).to(tl.float32)
            scores += tl.math.div_rn(col_a, norm_a)[:, None] * tl.math.div_rn(col_b, norm_b)[None, :]
        scores = tl.minimum(scores, COSINE_CAP)  # identical keys tie exactly (ops.rows.tie_cosines)
        if PADDED:
            size_b = tl.load(s_in + (2 * jb + 1) * S, mask=j_ok, other=1.0).to(tl.float32)
            pad_b = size_b == 0.0
            pair = (ia[:, None] * NB + jb[None, :]).to(tl.float32)  # < 2**24 for N <= 8192: exact
            order = 0.5 * (1.0 - tl.math.div_rn(pair, tl.full([BLOCK_A, BLOCK_J], NA * NB, tl.float32)))
            both = pad_a[:, None] & pad_b[None, :]
            either = pad_a[:, None] | pad_b[None, :]
            scores = tl.where(both, 2.0 + order, tl.where(either, -2.0 - order, scores))
        prot_b = (2 * jb + 1) < PROTECTED
        scores = tl.where(prot_a[:, None] | prot_b[None, :], float("-inf"), scores)
        scores = tl.where(j_ok[None, :], scores, float("-inf"))
        block_best = tl.max(scores, axis=1)
        hit = (scores == block_best[:, None]) & j_ok[None, :]
        block_col = tl.min(tl.where(hit, jb[None, :], NB + BLOCK_J), axis=1)
        better = block_best > best  # strict: an earlier block (lower column) wins a tie
        best_col = tl.where(better, block_col, best_col)
        best = tl.where(better, block_best, best)

    # Rank of each A row: rows ahead of it (higher best score, or equal and lower row), counted over tiles of
    # BLOCK_J other rows.
    rank = tl.zeros([BLOCK_A], tl.int32)
    for k0 in range(0, NA, BLOCK_J):
        ka = k0 + tl.arange(0, BLOCK_J)
        k_ok = (ka < NA) & live
        other = _pick(best, ia, ka, float("-inf"))
        ahead = (other[None, :] > best[:, None]) | ((other[None, :] == best[:, None]) & (ka[None, :] < ia[:, None]))
        rank += tl.sum((ahead & k_ok[None, :]).to(tl.int32), axis=1)
    rank = tl.where(a_ok, rank, NA)  # rows past the end never match a rank < NA
    merged = rank < R
    keep_a = a_ok & ~merged

    # Output positions: protected prefix in place, unmerged unprotected A rows, then unprotected B columns.
    UNMERGED: tl.constexpr = NA - (PROTECTED + 1) // 2 - R
    if R == 0:
        pos_a = 2 * ia
    elif PROTECTED > 0:  # unmerged unprotected rows before each row, counted over tiles of BLOCK_J rows
        before = tl.zeros([BLOCK_A], tl.int32)
        for k0 in range(0, NA, BLOCK_J):
            ka = k0 + tl.arange(0, BLOCK_J)
            k_kept = (ka < NA) & live & (_pick(rank, ia, ka, -1) >= R) & ((2 * ka) >= PROTECTED)
            before += tl.sum((k_kept[None, :] & (ka[None, :] < ia[:, None])).to(tl.int32), axis=1)
        pos_a = tl.where(prot_a, 2 * ia, PROTECTED + before)
    else:
        pos_a = rank - R
    for col in tl.static_range(S):
        tl.store(s_out + pos_a * S + col, tl.load(s_in + (2 * ia) * S + col, mask=keep_a), mask=keep_a)
    for c0 in range(0, C, BLOCK_J):
        cc = c0 + tl.arange(0, BLOCK_J)
        rows = keep_a[:, None] & (cc < C)[None, :]
        xa = tl.load(x_in + (2 * ia)[:, None] * C + cc[None, :], mask=rows)
        tl.store(x_out + pos_a[:, None] * C + cc[None, :], xa, mask=rows)

    # B columns: b + (sum_i s_i a_i - w b) / max(s_b + w, floor), w = sum_i s_i over the rows merged into b,
    # accumulated over the merged rows in rank order. Each tile visits only the rows merging into it (the next
    # such rank is a masked min), so a tile costs its own merges, not all R; the other rows would add exact zeros.
    for j0 in range(0, NB, BLOCK_B):
        jb = j0 + tl.arange(0, BLOCK_B)
        j_ok = (jb < NB) & live
        # Ranks of the rows merging into this tile (R for the others).
        tile_rank = tl.where(merged & (best_col >= j0) & (best_col < j0 + BLOCK_B), rank, R)
        first = _next_rank(tile_rank, -1, R)
        size_b = tl.load(s_in + (2 * jb + 1) * S, mask=j_ok, other=0.0).to(tl.float32)
        w = tl.zeros([BLOCK_B], tl.float32)
        k = first
        while k < R:
            src = tile_rank == k
            dst = tl.sum(tl.where(src, best_col, 0), axis=0)
            w += tl.where(jb == dst, tl.sum(tl.where(src, size_a, 0.0), axis=0), 0.0)
            k = _next_rank(tile_rank, k, R)
        size_new = size_b + w
        denom = tl.maximum(size_new, WEIGHT_FLOOR)
        if R == 0:
            pos_b = 2 * jb + 1
        else:
            pos_b = tl.where((2 * jb + 1) < PROTECTED, 2 * jb + 1, PROTECTED + UNMERGED + jb - PROTECTED // 2)
        tl.store(s_out + pos_b * S, size_new.to(size_out_ptr.dtype.element_ty), mask=j_ok)
        for col in tl.static_range(1, S):  # positions times sizes: summed like the sizes
            mass = tl.load(s_in + (2 * jb + 1) * S + col, mask=j_ok, other=0.0).to(tl.float32)
            k = first
            while k < R:
                src = tile_rank == k
                row = tl.sum(tl.where(src, ia, 0), axis=0)
                dst = tl.sum(tl.where(src, best_col, 0), axis=0)
                moved = tl.load(s_in + (2 * row) * S + col, mask=live, other=0.0).to(tl.float32)
                mass += tl.where(jb == dst, moved, 0.0)
                k = _next_rank(tile_rank, k, R)
            tl.store(s_out + pos_b * S + col, mass.to(size_out_ptr.dtype.element_ty), mask=j_ok)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C
            pulled = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
            k = first
            while k < R:
                src = tile_rank == k
                row = tl.sum(tl.where(src, ia, 0), axis=0)
                dst = tl.sum(tl.where(src, best_col, 0), axis=0)
                weight = tl.where(jb == dst, tl.sum(tl.where(src, size_a, 0.0), axis=0), 0.0)
                xa = tl.load(x_in + (2 * row) * C + cc, mask=c_ok & live, other=0.0).to(tl.float32)
                pulled += weight[:, None] * xa[None, :]
                k = _next_rank(tile_rank, k, R)
            xb = tl.load(x_in + (2 * jb + 1)[:, None] * C + cc[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
            xb = xb.to(tl.float32)
            new_b = xb + tl.math.div_rn(pulled - w[:, None] * xb, tl.broadcast_to(denom[:, None], pulled.shape))
            tl.store(
                x_out + pos_b[:, None] * C + cc[None, :],
                new_b.to(x_out_ptr.dtype.element_ty),
                mask=j_ok[:, None] & c_ok[None, :],
            )


@triton.jit
def _next_rank(tile_rank, k, R: tl.constexpr):
    """The lowest rank above ``k`` in ``tile_rank`` (R when none is left)."""
    return tl.min(tl.where(tile_rank > k, tile_rank, R), axis=0)


@triton.jit
def _pick(values, index, wanted, fill):
    """``values`` at the positions ``wanted`` of a register vector whose positions are ``index`` (``fill`` where
    absent): a masked max over a (len(values), len(wanted)) tile, as registers cannot be indexed."""
    return tl.max(tl.where(index[:, None] == wanted[None, :], values[:, None], fill), axis=0)


@triton.jit
def _row_norms(m_in, rows, ok, D: tl.constexpr):
    """L2 norms of metric rows ``rows`` (1 where ``ok`` is false, so masked rows never divide by 0)."""
    sq = tl.zeros(rows.shape, tl.float32)
    for d in range(D):
        col = tl.load(m_in + rows * D + d, mask=ok, other=0.0).to(tl.float32)
        sq += col * col
    return tl.where(ok, tl.maximum(tl.sqrt_rn(sq), 1e-12), 1.0)  # NORM_FLOOR: a zero key scores 0


@triton.jit
def topk_select_kernel(
    x_ptr,
    size_ptr,
    attn_ptr,
    batch,
    x_out_ptr,
    size_out_ptr,
    N: tl.constexpr,
    C: tl.constexpr,
    KEEP: tl.constexpr,
    PROTECTED: tl.constexpr,
    FUSE: tl.constexpr,
    KEEP_ORDER: tl.constexpr,
    S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """EViT Top-K selection of one batch item, with the optional fused token sum_i a_i x_i over pruned tokens.

    Tokens are processed in tiles of BLOCK_N rows (N may exceed BLOCK_N). The last kept token (rank KEEP - 1) is
    the threshold: a token is kept iff it is ahead of it or it, which is all the original-order positions and the
    fused token need, so a first pass finds it and the later passes compare against it. The S state columns (size,
    then positions times size) are gathered; the fused token sums them over the pruned tokens.
    """
    N_OUT: tl.constexpr = PROTECTED + KEEP + FUSE
    b = tl.program_id(0).to(tl.int64)
    live = b < batch
    x_in = x_ptr + b * (N * C)
    x_out = x_out_ptr + b * (N_OUT * C)
    s_in = size_ptr + b * (N * S)
    s_out = size_out_ptr + b * (N_OUT * S)
    a_in = attn_ptr + b * N

    last_score = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    last_index = tl.max(tl.full([BLOCK_N], -1, tl.int32), axis=0)
    if KEEP_ORDER or FUSE:
        for t0 in range(0, N, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            t_ok = (t < N) & live
            score = tl.load(a_in + t, mask=t_ok, other=0.0).to(tl.float32)
            last = t_ok & (t >= PROTECTED) & (_topk_rank(a_in, t, score, live, N, PROTECTED, BLOCK_K) == KEEP - 1)
            last_score = tl.maximum(last_score, tl.max(tl.where(last, score, float("-inf")), axis=0))
            last_index = tl.maximum(last_index, tl.max(tl.where(last, t, -1), axis=0))

    for t0 in range(0, N, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = (t < N) & live
        unprot = t_ok & (t >= PROTECTED)
        score = tl.load(a_in + t, mask=t_ok, other=0.0).to(tl.float32)
        rank = _topk_rank(a_in, t, score, live, N, PROTECTED, BLOCK_K)
        kept = unprot & (rank < KEEP)
        if KEEP_ORDER:
            before = tl.zeros([BLOCK_N], tl.int32)
            for k0 in range(PROTECTED, N, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = (k < N) & live
                other = tl.load(a_in + k, mask=k_ok, other=0.0).to(tl.float32)
                k_kept = k_ok & ((other > last_score) | ((other == last_score) & (k <= last_index)))
                before += tl.sum((k_kept[None, :] & (k[None, :] < t[:, None])).to(tl.int32), axis=1)
            pos = tl.where(t < PROTECTED, t, PROTECTED + before)
        else:
            pos = tl.where(t < PROTECTED, t, PROTECTED + rank)
        out = (t_ok & (t < PROTECTED)) | kept
        for col in tl.static_range(S):
            sizes = tl.load(s_in + t * S + col, mask=t_ok, other=0.0)
            tl.store(s_out + pos * S + col, sizes, mask=out)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C
            rows = tl.load(x_in + t[:, None] * C + cc[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            tl.store(x_out + pos[:, None] * C + cc[None, :], rows, mask=out[:, None] & c_ok[None, :])

    if FUSE:
        for col in tl.static_range(S):
            fused_size = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
            for t0 in range(0, N, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                t_ok = (t < N) & live
                score = tl.load(a_in + t, mask=t_ok, other=0.0).to(tl.float32)
                pruned = _topk_pruned(t, t_ok, score, last_score, last_index, PROTECTED)
                sizes = tl.load(s_in + t * S + col, mask=t_ok, other=0.0).to(tl.float32)
                fused_size += tl.sum(tl.where(pruned, sizes, 0.0), axis=0)
            tl.store(s_out + (PROTECTED + KEEP) * S + col, fused_size.to(size_out_ptr.dtype.element_ty), mask=live)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C
            fused = tl.zeros([BLOCK_C], tl.float32)
            for t0 in range(0, N, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                t_ok = (t < N) & live
                score = tl.load(a_in + t, mask=t_ok, other=0.0).to(tl.float32)
                weight = tl.where(_topk_pruned(t, t_ok, score, last_score, last_index, PROTECTED), score, 0.0)
                rows = tl.load(x_in + t[:, None] * C + cc[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
                fused += tl.sum(weight[:, None] * rows.to(tl.float32), axis=0)
            tl.store(
                x_out + (PROTECTED + KEEP) * C + cc, fused.to(x_out_ptr.dtype.element_ty), mask=c_ok & live
            )


@triton.jit
def _topk_rank(a_in, t, score, live, N: tl.constexpr, PROTECTED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rank of tokens ``t`` among the unprotected tokens: those ahead (higher score, or equal and lower index),
    counted over blocks of BLOCK_K reloaded scores."""
    rank = tl.zeros(t.shape, tl.int32)
    for k0 in range(PROTECTED, N, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k < N) & live
        other = tl.load(a_in + k, mask=k_ok, other=0.0).to(tl.float32)
        ahead = (other[None, :] > score[:, None]) | ((other[None, :] == score[:, None]) & (k[None, :] < t[:, None]))
        rank += tl.sum((ahead & k_ok[None, :]).to(tl.int32), axis=1)
    return rank


@triton.jit
def _topk_pruned(t, t_ok, score, last_score, last_index, PROTECTED: tl.constexpr):
    """Unprotected tokens behind the last kept one (rank >= KEEP)."""
    kept = (score > last_score) | ((score == last_score) & (t <= last_index))
    return t_ok & (t >= PROTECTED) & ~kept
