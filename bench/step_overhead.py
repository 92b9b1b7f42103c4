"""How much slower is our training step than the work TI cannot avoid?

(a) floor: text encoder(s) with the vectors spliced in + UNet forward + backward to the vectors,
    on pre-tokenized prompts and pre-noised latents (bench.common.Floor);
(b) ours:  one iteration of lib_ti.train's loop, run through the run layer as the CLI runs it
    (lib_ti.run.run with the CLI's FolderOutputs): latents from the cache, prompt building, noise
    and timesteps, encode_prompts, predict, loss, backward, optimizer step, the run layer's guard,
    progress report;
(c) of (b), the run layer's per-step guard (lib_ti.train.guard_update: the finite/norm check and
    the copy kept for a rollback), timed on tensors of the vectors' shapes.
All run on the same model, batch, resolution and precision, interleaved in one run: the loop's
progress callback times the loop's iteration since the previous callback, then runs one floor
step and one guard. Medians after warm-up. Then the size of the resume state (`<file>.ti-state`)
the run wrote beside its final file, and the same at the real SD1/SD2/SDXL widths (common.
resume_state_sizes). Last line: overhead_ratio=<b/a>.

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

from lib_ti import resume, run
from lib_ti.train import Callbacks, guard_update


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
    guard: list[float] = []
    last: list[float] = []
    hooks = Callbacks()

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
        vectors = {k: v.clone() for k, v in hooks.live.good.items()}
        kept = {k: v.clone() for k, v in hooks.live.good.items()}
        common.sync(dev)
        t2 = now()
        guard_update(vectors, kept)
        common.sync(dev)
        t3 = now()
        guard.append(t3 - t2)
        last[:] = [now()]

    hooks.progress = progress
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    result = run.run(cfg, model, run.FolderOutputs(cfg.output_dir), hooks)
    if prof:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    if result.status != "done":
        raise SystemExit(f"training ended with {result.status}: {result.message}")
    w = args.warmup
    return {"ours": ours[w:], "floor": bare[w + 1:], "guard": guard[w + 1:], "res": res, "output": result.output,
            "cfg": cfg}


def print_state_sizes(m: dict, args: argparse.Namespace, work: Path) -> None:
    output = Path(m["output"])
    state = Path(resume.state_path(str(output)))
    emb_b, state_b = output.stat().st_size, state.stat().st_size
    print(f"resume state beside the embedding ({m['cfg'].optimizer_type}; bytes):")
    print(f"  {'':30}{'embedding':>10}{'.ti-state':>10}{'ratio':>8}")
    print(f"  {'this run: ' + args.family + ' ' + args.size + f', {args.vectors} vectors':30}"
          f"{emb_b:>10,}{state_b:>10,}{state_b / emb_b:>8.1f}")
    for family, n, e, st in common.resume_state_sizes(state, m["cfg"], work):
        print(f"  {family + f' width, {n} vector' + ('s' if n > 1 else ''):30}{e:>10,}{st:>10,}{st / e:>8.1f}")
    print(f"resume_state_ratio={state_b / emb_b:.3f}")


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    if args.cheap_dtype:
        from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel

        DiffusersModel.dtype = property(lambda self: next(self.unet.parameters()).dtype)  # type: ignore[assignment]
    torch.manual_seed(0)
    model = common.build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(args, model, Path(tmp))
        print_state_sizes(m, args, Path(tmp))
    ours, floor, guard = m["ours"], m["floor"], m["guard"]
    a, b, c = common.median_ms(floor), common.median_ms(ours), common.median_ms(guard)
    ratio = b / a
    print(f"machine: {common.machine()}")
    print(f"model: {args.family} {args.size} ({common.preset(args)}), {m['res']} px, batch {args.batch}, "
          f"{args.vectors} vectors, precision {args.precision}, checkpointing {args.checkpointing}, "
          f"device {args.device}; {len(ours)} steps after {args.warmup} warm-up"
          + ("; model dtype patched (--cheap-dtype)" if args.cheap_dtype else ""))
    print(f"clock: {'main-thread CPU time' if common.clock(args) is time.thread_time else 'wall time'}")
    print(f"{'':28}{'median ms':>10}{'p10 ms':>9}{'p90 ms':>9}")
    for name, xs in (("(a) floor: TE+UNet fwd+bwd", floor), ("(b) our step (run layer)", ours),
                     ("(c) of (b): norm guard", guard)):
        print(f"{name:28}{common.median_ms(xs):10.2f}{common.quantile_ms(xs, 0.1):9.2f}"
              f"{common.quantile_ms(xs, 0.9):9.2f}")
    print(f"{'overhead (b - a)':28}{b - a:10.2f}")
    print(f"guard_share={c / b:.4f}")
    print(f"overhead_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
