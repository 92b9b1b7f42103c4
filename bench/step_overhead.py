"""How much slower is our training step than the work TI cannot avoid?

(a) floor: text encoder(s) with the vectors spliced in + UNet forward + backward to the vectors,
    on pre-tokenized prompts and pre-noised latents (bench.common.Floor);
(b) ours:  one iteration of lib_ti.train's loop (latents from the cache, prompt building, noise and
    timesteps, encode_prompts, predict, loss, backward, optimizer step, progress report).
Both run on the same model, batch, resolution and precision, interleaved in one run: the loop's
progress callback times the loop's iteration since the previous callback, then runs one floor
step. Medians after warm-up. Last line: overhead_ratio=<b/a>.

    python bench/step_overhead.py --quick                       # tiny SD1, CPU, < 1 min
    python bench/step_overhead.py --family sdxl --quick
    python bench/step_overhead.py --family sdxl --size full --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common
except ImportError:  # run as `python bench/step_overhead.py`
    import common  # type: ignore[no-redef]

from lib_ti.train import Callbacks, run_training


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.model_args(p, steps=60)
    p.add_argument("--profile", action="store_true", help="print where the loop's time goes (cProfile)")
    p.add_argument("--cheap-dtype", action="store_true",
                   help="diagnostic: read the model dtype from one parameter instead of diffusers' ModelMixin.dtype, "
                        "which walks every parameter on each call")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 30), min(args.warmup, 3)
    return args


def measure(args: argparse.Namespace, model, work: Path) -> dict:
    dev = model.device
    cfg, latents, texts, res = common.step_setup(args, model, work)
    floor = common.Floor(model, cfg, latents, texts, args.vectors)

    now = common.clock(args)
    ours: list[float] = []
    bare: list[float] = []
    last: list[float] = []

    def progress(p) -> None:
        if p.phase != "training":
            return
        common.sync(dev)
        t0 = now()
        if last:
            ours.append(t0 - last[0])
        floor.step()
        common.sync(dev)
        t1 = now()
        bare.append(t1 - t0)
        last[:] = [t1]

    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    result = run_training(cfg, model, Callbacks(progress=progress))
    if prof:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    if result.status != "done":
        raise SystemExit(f"training ended with {result.status}: {result.message}")
    w = args.warmup
    return {"ours": ours[w:], "floor": bare[w + 1:], "res": res}


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    if args.cheap_dtype:
        from lib_ti.family.diffusers_sd import DiffusersModel

        DiffusersModel.dtype = property(lambda self: next(self.unet.parameters()).dtype)  # type: ignore[assignment]
    torch.manual_seed(0)
    model = common.build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(args, model, Path(tmp))
    ours, floor = m["ours"], m["floor"]
    a, b = common.median_ms(floor), common.median_ms(ours)
    ratio = b / a
    print(f"machine: {common.machine()}")
    print(f"model: {args.family} {args.size} ({common.preset(args)}), {m['res']} px, batch {args.batch}, "
          f"{args.vectors} vectors, precision {args.precision}, checkpointing {args.checkpointing}, "
          f"device {args.device}; {len(ours)} steps after {args.warmup} warm-up"
          + ("; model dtype patched (--cheap-dtype)" if args.cheap_dtype else ""))
    print(f"clock: {'main-thread CPU time' if common.clock(args) is time.thread_time else 'wall time'}")
    print(f"{'':28}{'median ms':>10}{'p10 ms':>9}{'p90 ms':>9}")
    for name, xs in (("(a) floor: TE+UNet fwd+bwd", floor), ("(b) our training step", ours)):
        print(f"{name:28}{common.median_ms(xs):10.2f}{common.quantile_ms(xs, 0.1):9.2f}"
              f"{common.quantile_ms(xs, 0.9):9.2f}")
    print(f"{'overhead (b - a)':28}{b - a:10.2f}")
    print(f"overhead_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
