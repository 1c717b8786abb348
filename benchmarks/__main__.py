"""``python -m benchmarks --out DIR [--mode gpu|cpu|auto] [--quick] [--skip-e2e] [--budget SECONDS]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", required=True,
                        help="directory for results.json, results.md and the PNG plots; 'auto': "
                             "benchmarks/results/<date>-<device> (where committed runs live)")
    parser.add_argument("--mode", default="auto", choices=("gpu", "cpu", "auto"),
                        help="gpu: full suite on the CUDA device; cpu: labelled subsets on the CPU; auto: gpu if any")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test shapes (the figures are not Bark's)")
    parser.add_argument("--skip-e2e", action="store_true", help="kernels only")
    parser.add_argument("--skip-kernels", action="store_true", help="end to end only (the GPU command runs it first)")
    parser.add_argument("--budget", type=float, default=None, help="total wall-clock budget in seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the whole run (default: torch's default)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.mode == "cpu":
        # Triton under the interpreter is excluded from CPU timings; make sure it is never used implicitly.
        os.environ.pop("BARK_KERNELS_BACKEND", None)
    from .suite import run

    if args.out == "auto":
        import datetime
        from pathlib import Path

        import torch

        from . import report
        from .suite import resolve_mode

        mode = resolve_mode(args.mode)
        device = torch.device("cuda") if mode == "gpu" else torch.device("cpu")
        env = report.environment(device)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        suffix = ("-quick" if args.quick else "") + (f"-{args.threads}t" if args.threads else "")
        args.out = str(Path(__file__).resolve().parent / "results" / f"{date}-{report.short_device(env)}{suffix}")
    payload = run(args.out, mode=args.mode, quick=args.quick, skip_e2e=args.skip_e2e, budget_seconds=args.budget,
                  threads=args.threads, skip_kernels=args.skip_kernels)
    ok = sum(1 for r in payload["kernels"] if r["status"] == "ok")
    print(f"benchmarks: {ok} kernel measurements, e2e {payload['e2e']['status']}, "
          f"{payload['wall_seconds']:.0f} s; wrote {args.out}/results.json, results.md, {', '.join(payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
