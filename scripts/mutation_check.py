"""Mutation check of the Python layer: plants small, plausible bugs in a copy of
the installed ssl_ops package, one at a time, and runs the tests that should
catch each. Fails if any mutation survives (its tests still pass), or if the
unmutated copy does not pass them.

    python scripts/mutation_check.py [--list] [NAME ...]

The C++ and CUDA kernels are not mutated here (that needs a rebuild); their
planted bugs are compiled into the test-only emulation module
(tests/test_planted_kernel_bugs.py).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # in the ssl_ops package
    original: str  # must occur exactly once
    mutant: str
    tests: tuple  # pytest node ids or -k expressions, relative to the repo root


MUTATIONS = [
    Mutation(
        "sym: upstream gradient dropped",
        "contrastive.py",
        "grad_z = grad * grad_loss",
        "grad_z = grad",
        ("tests/test_nt_xent.py::test_reductions_and_row_weights",),
    ),
    Mutation(
        "sym: gradient sign flipped",
        "contrastive.py",
        "grad_z = grad * grad_loss",
        "grad_z = -grad * grad_loss",
        ("tests/test_nt_xent.py::test_matches_float64_reference",),
    ),
    Mutation(
        "asym: upstream gradient dropped",
        "contrastive.py",
        "grads = [g * grad_loss if n else None for n, g in zip(needs, stored)]",
        "grads = [g if n else None for n, g in zip(needs, stored)]",
        ("tests/test_info_nce.py::test_moco_queue_matches_reference",),
    ),
    Mutation(
        "asym: grad_mask of query and key swapped",
        "contrastive.py",
        "        grad_enabled and query.requires_grad,\n        grad_enabled and key.requires_grad,",
        "        grad_enabled and key.requires_grad,\n        grad_enabled and query.requires_grad,",
        ("tests/test_info_nce.py::test_forward_computes_the_gradient_and_backward_only_scales_it",),
    ),
    Mutation(
        "gathered NT-Xent rows: narrow at 0 instead of this rank's offset",
        "contrastive.py",
        "loss.narrow(0, anchors[0], rows)",
        "loss.narrow(0, 0, rows)",
        ("tests/test_distributed.py",),
    ),
    Mutation(
        "gathered InfoNCE: positive offset 0 instead of rank * batch",
        "contrastive.py",
        "offset = distributed.rank() * query.shape[0]",
        "offset = 0",
        ("tests/test_distributed.py",),
    ),
    Mutation(
        "all-gather backward: narrow at 0 instead of this rank's rows",
        "distributed.py",
        "total.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)",
        "total.narrow(0, 0, ctx.rows)",
        ("tests/test_distributed.py",),
    ),
    Mutation(
        "cosine rows: fixed eps in the backward",
        "cosine.py",
        "cosine_rows_backward(grad, x0, x1, ctx.eps, mask)",
        "cosine_rows_backward(grad, x0, x1, 1e-8, mask)",
        ("tests/test_cosine_losses.py::test_api_gradients_use_eps",),
    ),
    Mutation(
        "cosine matrix: fixed eps in the backward",
        "cosine.py",
        "cosine_similarity_matrix_backward(grad, a, b, ctx.eps, mask)",
        "cosine_similarity_matrix_backward(grad, a, b, 1e-8, mask)",
        ("tests/test_cosine_matrix.py::test_api_gradients_use_eps",),
    ),
    Mutation(
        "cosine rows: gradients of x0 and x1 swapped",
        "cosine.py",
        "g0, g1 = torch.ops.ssl_ops.cosine_rows_backward(",
        "g1, g0 = torch.ops.ssl_ops.cosine_rows_backward(",
        ("tests/test_cosine_losses.py::test_api_gradients_use_eps",),
    ),
    Mutation(
        "cosine matrix: grad_mask entries swapped",
        "cosine.py",
        "mask = [ctx.needs_input_grad[0], b is not None and ctx.needs_input_grad[1]]",
        "mask = [b is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[0]]",
        ("tests/test_cosine_matrix.py::test_api_autograd_and_reference",),
    ),
    Mutation(
        "CLIP: upstream gradient dropped",
        "clip.py",
        "out = [g * grad_loss.to(g.dtype) if need else None",
        "out = [g if need else None",
        ("tests/test_clip.py::test_upstream_gradient_scales_the_gradients",),
    ),
    Mutation(
        "KoLeo: a row may be its own neighbour",
        "koleo.py",
        "cosines.fill_diagonal_(-2)",
        "cosines.fill_diagonal_(2)",
        ("tests/test_koleo.py::test_matches_lightly_and_dinov2",),
    ),
    Mutation(
        "prepared EMA: buffer copies dropped",
        "ema.py",
        "self._prepared = (ema_local, online_local, copies)",
        "self._prepared = (ema_local, online_local, [])",
        ("tests/test_ema_tensor_momentum.py::test_prepared_update_is_the_functional_one_bit_for_bit",),
    ),
    Mutation(
        "EMA of modules: float buffers copied under buffers='ema'",
        "ema.py",
        'if e.is_floating_point() and buffers == "ema":',
        'if e.is_floating_point() and buffers == "never":',
        ("tests/test_ema_api.py",),
    ),
]


def package_dir():
    import importlib.util

    spec = importlib.util.find_spec("ssl_ops")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ssl_ops is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0])


def run_tests(site, tests):
    """pytest on `tests` with the package copy in `site` first on the path.
    Returns pytest's exit code (0 passed, 1 some failed, else an error)."""
    # Run from `site`: `python -m` puts the working directory first on sys.path,
    # and from the repository root that would be the unmutated ssl_ops.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
           "-c", str(ROOT / "pyproject.toml"), *[str(ROOT / t) for t in tests]]
    result = subprocess.run(cmd, cwd=site, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout[-2000:] + result.stderr[-2000:]


def imported_from(site):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    code = "import ssl_ops; print(ssl_ops.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True)
    return Path(result.stdout.strip()).resolve()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only mutations whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    mutations = list(MUTATIONS)
    if args.list:
        for m in mutations:
            print(f"{m.name}  [{m.file}]  -> {' '.join(m.tests)}")
        return 0
    if args.names:
        mutations = [m for m in mutations if any(n in m.name for n in args.names)]
    source = package_dir()
    failures = []
    with tempfile.TemporaryDirectory(prefix="ssl_ops_mutants_") as tmp:
        site = Path(tmp)
        copy = site / "ssl_ops"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        where = imported_from(site)
        if copy.resolve() not in where.parents:
            print(f"mutation check: the tests would import ssl_ops from {where}, not the copy", file=sys.stderr)
            return 1
        # The unmutated copy must pass every selected test, or a "caught" mutant proves nothing.
        all_tests = sorted({t for m in mutations for t in m.tests})
        code, out = run_tests(site, all_tests)
        if code != 0:
            print(out)
            print("mutation check: the unmutated package fails its tests", file=sys.stderr)
            return 1
        print(f"unmutated package passes {len(all_tests)} test selections")
        for m in mutations:
            path = copy / m.file
            text = (source / m.file).read_text()
            count = text.count(m.original)
            if count != 1:
                failures.append(f"{m.name}: the original text occurs {count} times in {m.file} (update the mutation)")
                print(f"STALE     {m.name}")
                continue
            path.write_text(text.replace(m.original, m.mutant))
            start = time.perf_counter()
            code, out = run_tests(site, m.tests)
            path.write_text(text)
            seconds = time.perf_counter() - start
            if code == 1:
                print(f"caught    {m.name} ({seconds:.1f} s)")
            elif code == 0:
                failures.append(f"{m.name}: survived {' '.join(m.tests)}")
                print(f"SURVIVED  {m.name}")
            else:
                failures.append(f"{m.name}: pytest exit {code} (an error, not a failing test)\n{out}")
                print(f"ERROR     {m.name} (pytest exit {code})")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"mutation check: all {len(mutations)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
