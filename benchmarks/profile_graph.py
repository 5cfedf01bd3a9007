"""Where a compiled MindSpore step spends its time, per module, from one profiled call (no extra graphs to compile).

MindSpore's profiler records every CPU kernel launch with its scope, the cell path of the op ("Default/...
/diffusion_model-UNetModel/..."; backward ops under "Gradients/"). Ops created by expanding a composite op (e.g.
the MatMul inside `ops.matmul`) are recorded under "Expand/..." without a cell path: they take the scope of the
op that ran just before them on the same thread, which is the op they belong to in a sequential graph.
Kernel times are summed per phase and scaled to the step's unprofiled wall time (the profiler adds overhead,
and time between kernels is spread in proportion).
"""
import glob
import os
import shutil
import tempfile


def kernel_events(folder):
    """[(start_us, duration_us, thread, scope)] of every kernel launch the profiler recorded under `folder`."""
    import json

    events = []
    for path in glob.glob(os.path.join(folder, "**", "trace_view.json"), recursive=True):
        with open(path) as f:
            for event in json.load(f):
                if event.get("ph") == "X":
                    events.append((float(event["ts"]), float(event["dur"]), event.get("tid", 0), event["name"]))
    return sorted(events)


def phase_times(events, classify):
    """{phase: kernel seconds}; unscoped ("Expand/...") kernels inherit the previous scoped kernel's scope."""
    last_scope, totals = {}, {}
    for _, duration, thread, name in events:
        if "-op" not in name:
            continue  # a scope's summary event, spanning the kernels it holds
        if name.startswith(("Default/", "Gradients/")):
            last_scope[thread] = name
        scope = last_scope.get(thread, name)
        phase = classify(scope)
        totals[phase] = totals.get(phase, 0.0) + duration / 1e6
    return totals


def profile_breakdown(step, seconds, classify, phases):
    """Run step() once under the profiler; {phase: seconds} of its kernels, scaled so that they sum to `seconds`
    (the step's measured unprofiled time). `classify(scope) -> phase`; every phase of `phases` is present."""
    import mindspore as ms

    folder = tempfile.mkdtemp(prefix="ms-profile-")
    try:
        profiler = ms.profiler.profile(activities=[ms.profiler.ProfilerActivity.CPU],
                                       on_trace_ready=ms.profiler.tensorboard_trace_handler(folder))
        profiler.start()
        step()
        profiler.step()
        profiler.stop()
        totals = phase_times(kernel_events(folder), classify)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    kernel_seconds = sum(totals.values())
    scale = seconds / kernel_seconds if kernel_seconds else 0.0
    return {phase: totals.get(phase, 0.0) * scale for phase in phases}
