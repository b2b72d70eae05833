"""Every benchmark in one command: the contrastive losses, the cosine ops,
CLIP and SigLIP at CLIP's shapes (quick: one case of each) and the EMA
update, on the CPU and, when present, the GPU. Each prints its table and
writes JSON (with the machine) to --out; the contrastive sweep also draws PNG
plots there.

    python -m benchmarks              # quick, about 2-3 minutes on a 2-core CPU
    python -m benchmarks --full       # the whole sweep
"""

import argparse
import subprocess
import sys

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole sweep (long on a CPU)")
    parser.add_argument("--out", default="results", help="folder for JSON and plots")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    full = ["--full"] if args.full else []
    runs = []
    for device in devices:
        no_compile = ["--no-compile"] if args.no_compile else []
        runs.append(["contrastive", "--device", device, *full, *no_compile])
        runs.append(["cosine", "--device", device, *full, *no_compile])
        runs.append(["clip", "--device", device, *([] if args.full else ["--quick"])])
    runs.append(["ema", "--devices", *devices, *([] if args.full else ["--quick"]),
                 *(["--no-compile"] if args.no_compile else [])])
    failed = []
    for run in runs:
        print(f"\n## python -m benchmarks.{' '.join(run)}\n", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{run[0]}", *run[1:], "--out", args.out]).returncode:
            failed.append(run[0])
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
