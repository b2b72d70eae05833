"""Do errors raised inside each op's kernel entry reach Python on this machine?

On the H200 runs of 2026-11-28 (torch 2.11, the image's /opt/gcc toolchain)
every error whose message formatted a number (EMA and cosine checks, CPU and
CUDA) died of a segmentation fault, while one with a message of strings only
raised (Note [Messages without iostreams], csrc/message.h). Each case below runs in its
own process, so one crash does not hide the others; for a crashing case the
native backtrace is taken with cuda-gdb when it is installed.

    python scripts/gpu_error_probe.py [--gdb]
"""

import shutil
import subprocess
import sys

PRELUDE = "import torch, ssl_ops\nop = torch.ops.ssl_ops\n"
CASES = {
    "cpu ema_update_ (bad momentum)": "op.ema_update_([torch.randn(4)], [torch.randn(4)], -0.1)",
    "cpu contrastive (bad labels)": "ssl_ops.nt_xent_loss(torch.randn(4, 3), labels=torch.arange(3))",
    "cpu torch's own error (shapes in the message)": "torch.mm(torch.randn(2, 3), torch.randn(2, 3))",
    "cuda contrastive (route setting)":
        "import os; os.environ['SSL_OPS_CUDA_CONTRASTIVE_ROUTE'] = 'fast'\n"
        "z = torch.randn(6, 4, device='cuda'); labels = torch.arange(3, device='cuda').repeat(2)\n"
        "op.contrastive_sym_loss(z, labels, 0, 6, 2.0, 1e-12, True, 1, True)",
    "cuda cosine_rows (shape)": "op.cosine_rows(torch.randn(4, 3, device='cuda'), torch.randn(4, 2, device='cuda'), 1e-8)",
    "cuda ema_update_ (bad momentum, in ema_check.cpp)":
        "op.ema_update_([torch.randn(4, device='cuda')], [torch.randn(4, device='cuda')], -0.1)",
    "cuda _ema_update_chunked_ (bad chunk, in ema.cu)":
        "op._ema_update_chunked_([torch.randn(4, device='cuda')], [torch.randn(4, device='cuda')], 0.5, 12)",
    "cuda ema_update_ (valid)":
        "e = [torch.randn(4, device='cuda')]; op.ema_update_(e, [torch.randn(4, device='cuda')], 0.5); "
        "torch.cuda.synchronize()",
}
BODY = PRELUDE + "try:\n    {stmt}\n    print('no error')\nexcept Exception as e:\n    print('raised', type(e).__name__)\n"


def run_case(statement, gdb=False):
    code = BODY.format(stmt=statement.replace("\n", "\n    "))
    command = [sys.executable, "-c", code]
    if gdb:
        command = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result.returncode, (result.stdout + result.stderr).strip()


def main():
    gdb = "--gdb" in sys.argv and shutil.which("cuda-gdb") is not None
    crashed = []
    for name, statement in CASES.items():
        code, output = run_case(statement)
        last = output.splitlines()[-1] if output else ""
        print(f"{name:52} exit {code:4}  {last[:90]}", flush=True)
        if code != 0:
            crashed.append((name, statement))
    if gdb and crashed:
        name, statement = crashed[-1]
        print(f"\n--- cuda-gdb backtrace: {name} ---")
        print(run_case(statement, gdb=True)[1][-6000:])
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
