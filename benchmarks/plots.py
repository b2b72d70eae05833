"""PNG plots of the contrastive-loss sweep: time and peak extra memory against
the batch size (log scales), one line per implementation, for each dtype,
feature count and pass. Sizes where an implementation ran out of memory are
marked "OOM" on the memory plot.

    python -m benchmarks.plots results/contrastive_cpu.json [...]   # writes PNGs next to each JSON
"""

import json
import os
import sys

STYLES = {"fused": ("tab:blue", "o"), "eager": ("tab:red", "s"), "compiled": ("tab:orange", "^")}


def _series(rows, impl, key):
    xs, ys, oom = [], [], []
    for r in rows:
        entry = r.get(impl)
        if entry is None or (key in entry and entry[key] is None):
            continue
        if entry.get("oom"):
            oom.append(r["rows"])
        else:
            xs.append(r["rows"])
            ys.append(entry[key] * (1e3 if key == "median_s" else 2**-20))
    return xs, ys, oom


def plot_file(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["loss"] == "nt_xent"]
    groups = sorted({(r.get("dtype", "float32"), r["d"], r["mode"]) for r in rows})
    written = []
    for dtype, d, mode in groups:
        sel = sorted((r for r in rows if (r.get("dtype", "float32"), r["d"], r["mode"]) == (dtype, d, mode)),
                     key=lambda r: r["rows"])
        device = sel[0].get("device", "cpu")
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for impl, (color, marker) in STYLES.items():
            for ax, key in ((ax_t, "median_s"), (ax_m, "peak_extra_bytes")):
                xs, ys, oom = _series(sel, impl, key)
                if xs:
                    ax.plot(xs, ys, color=color, marker=marker, label=impl)
                for x in oom:
                    ax.annotate("OOM", (x, ax.get_ylim()[1] if ys else 1), color=color, ha="center")
        for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rows 2N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"NT-Xent {mode}, D={d}, {dtype}, {device} ({data['machine'].get('gpu') or data['machine']['processor']})")
        fig.tight_layout()
        out = os.path.splitext(path)[0] + f"_nt_xent_{dtype}_d{d}_{mode.replace('+', '_')}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def main():
    for path in sys.argv[1:]:
        for out in plot_file(path):
            print(f"plot: {out}")


if __name__ == "__main__":
    main()
