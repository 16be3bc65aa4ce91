"""
What the benchmarks measure a call with: its wall time, the peak of tensor memory it allocates, its FLOPs as
torch counts them, and the machine's dense matmul throughput to hold those FLOPs against. Imported as a sibling
(`from measure import timed`) by the scripts beside it: `python bench/x.py` and torchrun put bench/ on sys.path.
"""
import time

import torch


def sync(device):
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing on a CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device=None):
    """(seconds, fn()): wall time of one call, the device's queued work included when `device` is a GPU."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def peak_memory(fn, device):
    """Peak bytes of tensors allocated during fn() above those live before it.

    CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before it. CPU: the same
    quantity from torch's profiler (every tensor allocation and free during the call, summed in time order).
    Both count tensors only (no allocator caching, no Python objects)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation (+bytes) and free (-bytes), in time order (kineto's raw events; prof.events() keeps
    # only those not attributed to an operator).
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def torch_flops(fn, cpu_attention=True):
    """The FLOPs of fn() as torch's FlopCounterMode counts them (matmuls, convolutions, attention). With
    cpu_attention, the CPU's flash-attention kernels are counted as torch counts the GPU's (the full L x L
    square: a mask skips no work); without, torch's own count, which leaves them out (0 FLOPs)."""
    from torch.utils import flop_counter
    aten = torch.ops.aten
    mapping = {  # FlopCounterMode hands these the arguments' shapes
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *args, **kwargs: flop_counter.sdpa_flop_count(query, key, value),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, query, key, value, *args, **kwargs: flop_counter.sdpa_backward_flop_count(grad, query, key,
                                                                                                  value)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping if cpu_attention else None) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype, sizes, repeats=3):
    """Best dense torch.mm throughput (FLOP/s) over size x size squares of each size."""
    best = 0.0
    for size in sizes:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        best = max([best] + [2 * size ** 3 / timed(lambda: a @ b, device)[0] for _ in range(repeats)])
    return best
