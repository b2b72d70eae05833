"""Shared pieces of the benchmarks: timing, peak memory of a case run in a
fresh process, and the description of the machine."""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import ssl_ops


def median_seconds(fn, min_run_time, device="cpu"):
    """Median time of one fn() call (interleaved_medians of fn alone)."""
    return interleaved_medians({"fn": fn}, min_run_time, device)["fn"]


def interleaved_medians(fns, min_run_time, device="cpu"):
    """Median time of one call of each fn in the dict, timed in blocks as
    torch.utils.benchmark's blocked_autorange does: after a warm-up call, blocks
    of calls sized to take at least 1/20 of min_run_time each, until each fn has
    run min_run_time; the median of its blocks' per-call times. The fns take
    turns block by block, so a slow spell of the machine falls on all of them
    and their ratios hold. On CUDA each block ends with a synchronisation.
    (torch.utils.benchmark itself is not used: it imports
    torch.utils.cpp_extension, which warns at import on machines without CUDA.)"""

    def block(fn, calls):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls

    calls = {}
    for name, fn in fns.items():
        once = block(fn, 1)  # warm-up, and the size of a call
        calls[name] = max(1, int(min_run_time / 20 / max(once, 1e-9)))
    per_call = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)

    def unfinished(name):
        return spent[name] < min_run_time or len(per_call[name]) < 3

    while any(unfinished(name) for name in fns):
        for name, fn in fns.items():
            if unfinished(name):
                seconds = block(fn, calls[name])
                per_call[name].append(seconds)
                spent[name] += seconds * calls[name]
    return {name: statistics.median(times) for name, times in per_call.items()}


def timed_in_turns(impls, make_inputs, run_once, min_run_time, device="cpu"):
    """Median time of run_once(impl, inputs) for each impl, each on inputs of
    its own (make_inputs()), taken in turns (interleaved_medians)."""
    calls = {}
    for impl in impls:
        inputs = make_inputs()
        calls[impl] = lambda impl=impl, inputs=inputs: run_once(impl, inputs)
    return interleaved_medians(calls, min_run_time, device)


def machine():
    info = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ssl_ops_build": ssl_ops.build_info(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes_here(run):
    """Peak resident memory that run() adds on top of what is resident before
    it (Linux: the high-water mark is reset through /proc/self/clear_refs)."""
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return max(0, _rss_kib("VmHWM") - before) * 1024


def measure_in_subprocess(module, case, memory_limit_bytes=None, timeout=1800):
    """Runs `python -m benchmarks.<module> --child CASE_JSON` in a fresh process
    and returns its JSON answer; {"oom": True} when it ran out of memory (the
    child's address space is capped at memory_limit_bytes, so an allocation
    fails cleanly instead of waking the OOM killer)."""

    def limit():
        if memory_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--child", json.dumps(case)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower() or proc.returncode in (-9, 137):
        return {"oom": True}
    raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def cuda_peak_extra(prepare, run):
    """Peak CUDA memory that run(inputs) allocates beyond inputs = prepare();
    {"oom": True} when it runs out of memory."""
    torch.cuda.empty_cache()
    inputs = prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        run(inputs)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before}
