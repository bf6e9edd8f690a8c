"""Forward+backward of the Triton kernels at B=1, three times, for Nsight Compute to profile the two sweeps (the
third pass; the first two compile and warm). Version 9 in docs/design.md ran it on an H100 as

    ncu --clock-control none --kernel-name regex:"(fwd|bwd)_scan_kernel" --launch-skip 4 --launch-count 2 \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
        --section SourceCounters --section ComputeWorkloadAnalysis -o sweeps python3 bench/ncu_sweeps.py
    ncu --import sweeps.ncu-rep --page details                              # -> results/ncu_sweeps_h100.txt
    ncu --import sweeps.ncu-rep --page source --csv --print-source sass     # stall samples per instruction

Shapes: NCU_T tokens (8192), 16 heads, m = 64, d = 128, bf16.
"""

import os

import torch
from lattice_plugin.kernels.gates import normalize_slots
from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton

from lattice_plugin.bench import lattice_inputs

B, T = 1, int(os.environ.get("NCU_T", 8192))
q, k, v, beta, s0 = lattice_inputs(B, T, 16, 16, 64, 128, requires_grad=True, device="cuda")
grad = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    o, _ = chunk_lattice_triton(q, k, v, beta, normalize_slots(s0).unsqueeze(0).expand(B, -1, -1, -1))
    torch.autograd.grad(o, [q, k, v, beta, s0], grad)
torch.cuda.synchronize()
