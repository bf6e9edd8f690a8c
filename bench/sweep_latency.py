"""One device call: where the forward sweep's time goes. ``_fwd_scan_kernel`` alone (bf16, H=16, m=64, d=128, exact
gates, orthogonal + retraction) at B x T = 1 x 32768 and 16 x 2048, against copies of it that change only how the
sub-chunk's inputs reach the registers.

Hypothesis (bench/NOTES.md, version 6): with 64 programs the sweep is latency-bound; the sub-chunk's loads (V, k,
beta, the Gram entries) are issued shortly before their use, so each wave of loads waits a full memory latency.
Variants (all exact: same arithmetic, same order; their ``c``, states and final state are compared with v5's):

- ``v5``: kernels/triton_chunk.py as it is (scalar Gram and beta loads at each step).
- ``vec``: each step's Gram row ``v_j . v_u`` (``u >= j``; the Gram matrix is symmetric) is 1-4 vector loads,
  ``beta`` one 16-wide load per sub-chunk.
- ``vec_up``: as ``vec`` with all 16 Gram rows issued at the top of the sub-chunk.
- ``pipe``: as ``vec``, and the V, k and beta tiles of sub-chunk i+1 are loaded during sub-chunk i (carried in
  loop variables: their latency hides behind a whole sweep).
- ``pipe_l1`` / ``pipe_l2``: ``pipe`` plus a ``prefetch.global.L1`` / ``.L2`` of sub-chunk i+1's Gram rows during
  sub-chunk i (the Gram rows are too many registers to carry; a prefetch hint costs none).
- ``pf_l1`` / ``pf_l2``: ``vec`` plus prefetch hints for every tile of sub-chunk i+1 (V, k, beta, Gram rows),
  nothing carried in registers (what the register-starved reverse sweep could afford).
- ``*_w1``, ``*_w4``: the same at 1 or 4 warps (2 elsewhere).

Compilation runs first in worker processes (Triton's disk cache). Writes ``$OUT/sweep_latency_<card>.json``.
SWEEPS_DRY=1 rehearses it on the CPU (interpreter, tiny shapes; the prefetch variants need inline PTX and are skipped).
"""

import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DRY = bool(os.environ.get("SWEEPS_DRY"))
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lattice_plugin.kernels import triton_chunk as tc  # noqa: E402
from lattice_plugin.kernels.triton_chunk import _gates, _opaque, _pack_rows, _split_all, _unpack_rows  # noqa: E402

DEV = "cpu" if DRY else "cuda"
OUT = Path(os.environ.get("OUT") or "/tmp/out")
SHAPES = [(1, 32768), (16, 2048)]
HEADS, M, D = 16, 64, 128
REP_MS = 200
if DRY:
    SHAPES, HEADS, M, D, REP_MS = [(1, 160), (2, 64)], 2, 32, 32, 1
VARIANTS = {  # name: (GVEC, PIPE, PF, warps); GVEC 0 = the v5 kernel itself
    "v5": (0, 0, 0, 2),
    "vec": (1, 0, 0, 2),
    "vec_up": (2, 0, 0, 2),
    "pipe": (1, 1, 0, 2),
    "pipe_l1": (1, 1, 1, 2),
    "pipe_l2": (1, 1, 2, 2),
    "pf_l1": (1, 0, 1, 2),
    "pf_l2": (1, 0, 2, 2),
    "v5_w4": (0, 0, 0, 4),
    "pipe_l1_w1": (1, 1, 1, 1),
    "pipe_l1_w4": (1, 1, 1, 4),
}
if DRY:
    VARIANTS = {n: p for n, p in VARIANTS.items() if p[2] == 0}
STARTED = time.time()


@triton.jit
def _scalars(x):
    """A 16-element tensor as a tuple of 16 scalars held by every thread (the unpack of ``_uniform_row``)."""
    t = _split_all(_split_all(_split_all(_split_all((tl.reshape(x, [2, 2, 2, 2]),)))))
    out = ()
    for j in tl.static_range(16):
        out = out + (t[(j % 2) * 8 + (j // 2 % 2) * 4 + (j // 4 % 2) * 2 + j // 8],)
    return out


@triton.jit
def _vec(p, N: tl.constexpr):
    """``N`` (4, 8 or 16) contiguous floats as uniform scalars: ``tc._uniform_row``."""
    return tc._uniform_row(p, N)


@triton.jit
def _row_suffix(p, j: tl.constexpr):
    """Entries ``u >= j`` of the 16-float row at ``p`` as a 16-tuple of uniform scalars, loaded in aligned groups
    (entries before ``j``'s group of 4 are zeros and never read)."""
    if j < 4:
        out = _vec(p, 16)
    elif j < 8:
        out = (0.0, 0.0, 0.0, 0.0) + _vec(p + 4, 4) + _vec(p + 8, 8)
    elif j < 12:
        out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0) + _vec(p + 8, 8)
    else:
        out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0) + _vec(p + 12, 4)
    return out


@triton.jit
def _prefetch(p, LEVEL: tl.constexpr, NL: tl.constexpr):
    """A cache hint (L1 or L2) for ``NL`` 128-byte lines from each row start in the ``[16]`` pointers ``p``."""
    EPL: tl.constexpr = 1024 // p.dtype.element_ty.primitive_bitwidth
    lines = p[:, None] + tl.arange(0, NL)[None, :] * EPL
    if LEVEL == 1:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _fwd_scan_variant(
    k, v, beta, s_init, gram, c_out, states, s_final,
    T, NC,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    GVEC: tl.constexpr, PIPE: tl.constexpr, PF: tl.constexpr,
):
    """``tc._fwd_scan_kernel`` for exact gates without ``||s||^2`` tracking, with the load schedule of the variant."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    m_mask = o_m < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_c = tl.arange(0, BCC)
    s_off = o_d[:, None] * M + o_m[None, :]
    s_mask = d_mask[:, None] & m_mask[None, :]
    S = tl.load(s_init + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    ns = tl.full([BM], 1.0, dtype=tl.float32)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    vd_mask = (o_c < BCC)[:, None] & d_mask[None, :]
    rmask = (o_c < BCC)[:, None] & m_mask[None, :]
    if PIPE:
        Vn = tl.load(v + (tok0 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0)
        Kn = tl.load(k + (tok0 + o_c * H)[:, None] * M + o_m[None, :], mask=rmask, other=0.0)
        Bn = tl.load(beta + tok0 + o_c * H)
    t0 = 0
    while t0 < T:
        if t0 % CS == 0:
            if NORMALIZE and t0 > 0:
                S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
            tl.store(states + (i_bh.to(tl.int64) * NC + t0 // CS) * D * M + s_off, S, mask=s_mask)
        row0 = tok0 + t0 * H
        p_g = gram + row0 * BCC
        if PIPE:
            Vraw = Vn
            Kraw = Kn
            Braw = Bn
            nxt = t0 + BCC < T
            row1 = row0 + BCC * H
            Vn = tl.load(v + (row1 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask & nxt, other=0.0)
            Kn = tl.load(k + (row1 + o_c * H)[:, None] * M + o_m[None, :], mask=rmask & nxt, other=0.0)
            Bn = tl.load(beta + row1 + o_c * H, mask=(o_c < BCC) & nxt, other=0.0)
            if PF > 0:
                _prefetch(gram + (tl.where(nxt, row1, row0) + o_c * H) * BCC, PF, 1)
        else:
            if PF > 0:  # hints only: every tile of the next sub-chunk
                rp = tl.where(t0 + BCC < T, row0 + BCC * H, row0) + o_c * H
                _prefetch(v + rp * D, PF, (BD * 2 + 127) // 128)
                _prefetch(k + rp * M + i_m * BM, PF, 1)
                _prefetch(beta + rp, PF, 1)
                _prefetch(gram + rp * BCC, PF, 1)
            Vraw = tl.load(v + (row0 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0)
            Kraw = tl.load(k + (row0 + o_c * H)[:, None] * M + o_m[None, :], mask=rmask, other=0.0)
            Braw = tl.load(beta + row0 + o_c * H)
        Vf = Vraw.to(tl.float32)
        Y = _unpack_rows(tl.dot(Vf, S, input_precision=PREC))
        Ks = _unpack_rows(Kraw.to(tl.float32))
        Bsc = _scalars(Braw.to(tl.float32))
        if GVEC == 2:
            Gr = ()
            for j in tl.static_range(BCC):
                Gr = Gr + _row_suffix(p_g + j * H * BCC, j)
        Cs = ()
        As = ()
        Bs = ()
        for j in tl.static_range(BCC):
            if GVEC == 2:
                g = ()
                for u in tl.static_range(BCC):
                    g = g + (Gr[j * BCC + u],)
            else:
                g = _row_suffix(p_g + j * H * BCC, j)
            c = Y[j]
            a, b, _ = _gates(c, Bsc[j] * Ks[j], g[j], ns, ORTHOGONAL, NORMALIZE)
            Cs = Cs + (c,)
            Yn = ()
            for u in tl.static_range(BCC):
                if u <= j:
                    Yn = Yn + (Y[u],)
                else:
                    Yn = Yn + (a * Y[u] + b * g[u],)
            Y = Yn
            As = As + (a,)
            Bs = Bs + (b,)
        tl.store(c_out + (row0 + o_c * H)[:, None] * M + o_m[None, :], _pack_rows(Cs), mask=rmask)
        A = tl.full([BM], 1.0, dtype=tl.float32)
        Wr = ()
        for jj in tl.static_range(BCC):
            Wr = (Bs[BCC - 1 - jj] * A,) + Wr
            A = A * As[BCC - 1 - jj]
        S = S * _opaque(A)[None, :] + tl.dot(tl.trans(Vf), _pack_rows(Wr), input_precision=PREC)
        t0 += BCC
    if NORMALIZE:
        S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
    tl.store(s_final + i_bh.to(tl.int64) * D * M + s_off, S, mask=s_mask)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def setup(B, T):
    from lattice_plugin.bench import lattice_inputs
    from lattice_plugin.kernels.gates import normalize_slots

    torch.manual_seed(B * 100003 + T)
    _, k, v, beta, s0 = lattice_inputs(B, T, HEADS, HEADS, M, D, device=DEV)
    state = normalize_slots(s0).unsqueeze(0).expand(B, -1, -1, -1).contiguous()
    gram = tc._sub_gram(v, v)
    NC = triton.cdiv(T, tc.CS_EXACT)
    return dict(B=B, T=T, k=k, v=v, beta=beta, state=state, gram=gram, NC=NC)


def launch(name, x):
    """Run one variant on the inputs ``x``: ``(c, states, final)``."""
    gvec, pipe, pf, warps = VARIANTS[name]
    B, T, NC = x["B"], x["T"], x["NC"]
    c = torch.full((B, T, HEADS, M), float("nan"), device=DEV)
    states = torch.full((B, HEADS, NC, D, M), float("nan"), device=DEV)
    final = torch.full((B, HEADS, D, M), float("nan"), device=DEV)
    BM, BD = tc.BM_SCAN, triton.next_power_of_2(D)
    grid = (triton.cdiv(M, BM), B * HEADS)
    prec = "tf32"
    if gvec == 0:
        tc._fwd_scan_kernel[grid](
            x["k"], x["v"], x["beta"], x["state"], x["gram"], c, c, states, final, c, T, NC,
            HEADS, M, D, tc.BC, tc.CS_EXACT, BM, BD, True, ORTHOGONAL=True, NORMALIZE=True, TRACK_NS=False,
            PREC=prec, num_warps=warps,
        )
    else:
        _fwd_scan_variant[grid](
            x["k"], x["v"], x["beta"], x["state"], x["gram"], c, states, final, T, NC,
            HEADS, M, D, tc.BC, tc.CS_EXACT, BM, BD, True, True, prec, gvec, pipe, pf, num_warps=warps,
        )
    return c, states, final


def warm(name):
    started = time.time()
    launch(name, setup(1, 128))
    sync()
    return dict(variant=name, compile_s=round(time.time() - started, 1))


def bench(fn):
    if DRY:
        started = time.time()
        fn()
        return (time.time() - started) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=REP_MS, return_mode="median")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    card = "cpu" if DRY else "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
    path = OUT / f"sweep_latency_{card}.json"
    report = dict(device=device, torch=torch.__version__, triton=triton.__version__, variants=VARIANTS,
                  script=Path(__file__).read_text())
    save = lambda: path.write_text(json.dumps(report, indent=1))  # noqa: E731
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(len(VARIANTS), 12), mp_context=ctx) as pool:
        report["warm"] = []
        for name, f in [(n, pool.submit(warm, n)) for n in VARIANTS]:
            try:
                report["warm"].append(f.result())
            except Exception:
                report["warm"].append(dict(variant=name, error=traceback.format_exc()[-1500:]))
            print(report["warm"][-1], f"{time.time() - STARTED:.0f}s", flush=True)
    save()
    ok = [w["variant"] for w in report["warm"] if "error" not in w]
    report["rows"] = rows = []
    for B, T in SHAPES:
        x = setup(B, T)
        ref = launch("v5", x)
        sync()
        diffs = {}
        for name in ok:
            out = launch(name, x)
            sync()
            diffs[name] = max(((o - r).abs().max().item() if torch.isfinite(o).all() else float("inf"))
                              for o, r in zip(out, ref))
        for rep in range(2):
            for name in ok:
                ms = bench(lambda name=name: launch(name, x))
                rows.append(dict(variant=name, B=B, T=T, repeat=rep, ms=ms, max_diff_vs_v5=diffs[name],
                                 us_per_subchunk=ms * 1e3 / (T // tc.BC)))
                print(f"{name:>11} B={B:>2} T={T:>5} rep {rep}: {ms:8.3f} ms  diff {diffs[name]:.1e}", flush=True)
                save()
        del x
        if not DRY:
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.time() - STARTED, 1)
    save()
    print(f"\n{'variant':>11} {'B x T':>9} {'ms (2 reps)':>19} {'us/sub-chunk':>12} {'diff':>8}")
    for B, T in SHAPES:
        for name in ok:
            r = [x for x in rows if x["variant"] == name and x["B"] == B and x["T"] == T]
            if r:
                print(f"{name:>11} {B:>3}x{T:<5} {r[0]['ms']:9.3f} {r[-1]['ms']:9.3f} {r[0]['us_per_subchunk']:12.2f}"
                      f" {r[0]['max_diff_vs_v5']:8.1e}")
    print(f"done in {report['wall_s']}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
