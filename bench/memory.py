"""Memory of our training step against the floor and against the peers' full-token-table approach.

floor       text encoder(s) + UNet forward + backward to the vectors, nothing kept between steps
ours        lib_ti.train's loop: the vectors, their last good copy and AdamW's two moments persist;
            each step adds activations and the vectors' gradients
full table  kohya / diffusers / InvokeAI: the whole token-embedding table is the AdamW parameter,
            a copy of it restores the rows that are not the new token's after every step

Each figure is persistent bytes (counted tensor by tensor) + the step's transient peak above what
was allocated before it (CUDA: allocator statistics; CPU: the profiler's log of every tensor
allocation and free). Model weights are left out of all three. Last line:
extra_peak_ratio=<ours / floor>.

    python bench/memory.py --quick
    python bench/memory.py --family sdxl --size full --precision bf16 --device cuda --resolution 1024 --batch 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

try:
    from bench import common
except ImportError:  # run as `python bench/memory.py`
    import common  # type: ignore[no-redef]

from lib_ti.optim import make_optimizer
from lib_ti.train import Callbacks, run_training

VOCAB = 49408


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.model_args(p, steps=2)
    p.add_argument("--no-real-shapes", action="store_true",
                   help="skip counting optimizer bytes on real-size (49408 x 768/1280) tables")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.no_real_shapes = 1, 2, True
    return args


class FullTable(common.Floor):
    """The peers' step: the token tables themselves train (dense gradient over every row), AdamW
    over them, and every row but the new token's is copied back from a saved table afterwards."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.saved, self.tables, self.rows = [], [], {}
        for slot, te, batch in self.encoders:
            emb = te.get_input_embeddings()
            n = int(self.vectors[slot].shape[0])
            rows = torch.arange(VOCAB - 2 - n, VOCAB - 2, device=batch.ids.device)  # stand-ins for new rows
            # the new token's positions read its own rows, as after tokenizer.add_tokens
            batch.ids = torch.where(batch.slot >= 0, rows[batch.slot.clamp(min=0)], batch.ids)
            batch.has_slots = False
            table = torch.nn.Parameter(emb.weight.detach().float().clone())
            self.saved.append((emb, emb.weight))
            emb.weight = table
            self.tables.append(table)
            self.rows[id(table)] = rows
        self.restore_copies = [t.detach().clone() for t in self.tables]  # kohya's orig_embeds_params
        self.opt = torch.optim.AdamW(self.tables, lr=1e-3, weight_decay=0.0)

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()
        with torch.no_grad():
            for table, orig in zip(self.tables, self.restore_copies):
                keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
                keep[self.rows[id(table)]] = False
                table[keep] = orig[keep]
        self.opt.zero_grad(set_to_none=True)

    def persistent(self) -> int:
        return common.optimizer_bytes(self.opt) + common.tensor_bytes(self.restore_copies)

    def grad_bytes(self) -> int:
        return common.tensor_bytes(self.tables)

    def close(self) -> None:
        for emb, weight in self.saved:
            emb.weight = weight


def adamw_bytes(shapes: list[tuple[int, int]], device: str = "cpu") -> tuple[int, int]:
    """(optimizer state bytes, gradient bytes) after one AdamW step over fp32 tensors of `shapes`,
    counted from the tensors the optimizer really allocates."""
    params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    return common.optimizer_bytes(opt), common.tensor_bytes(p.grad for p in params)


def ours_optimizer_bytes(cfg, model, n: int) -> tuple[int, int]:
    """The loop's own optimizer (lib_ti.optim.make_optimizer) over the loop's vectors, one step."""
    vecs = [torch.zeros(n, w, device=model.device, requires_grad=True) for w in model.slots().values()]
    for v in vecs:
        v.grad = torch.zeros_like(v)
    opt = make_optimizer(cfg, vecs, 1e-3)
    opt.step()
    return common.optimizer_bytes(opt), common.tensor_bytes(v.grad for v in vecs)


def measure(args: argparse.Namespace, model, work: Path) -> dict:
    dev = model.device
    cfg, latents, texts, res = common.step_setup(args, model, work)
    meter = common.PeakMeter(dev)
    out: dict = {"res": res}
    vec_bytes = common.tensor_bytes(torch.zeros(args.vectors, w) for w in model.slots().values())

    with model.training(args.checkpointing):
        floor = common.Floor(model, cfg, latents, texts, args.vectors)
        floor.step()
        meter.start()
        floor.step()
        out["floor"] = (vec_bytes, meter.stop())
        del floor
        table = FullTable(model, cfg, latents, texts, args.vectors)
        try:
            table.step()
            meter.start()
            for _ in range(args.steps):
                table.step()
            out["table"] = (table.persistent(), meter.stop())
            out["table_opt"] = (common.optimizer_bytes(table.opt), table.grad_bytes())
        finally:
            table.close()
        del table

    opt_b, grad_b = ours_optimizer_bytes(cfg, model, args.vectors)
    out["ours_opt"] = (opt_b, grad_b)
    first, last = args.warmup, args.warmup + args.steps

    def progress(p) -> None:
        if p.phase != "training":
            return
        if p.step == first:
            meter.start()
        elif p.step == last:
            out["ours"] = (2 * vec_bytes + opt_b, meter.stop())  # vectors + last good copy + moments

    result = run_training(cfg, model, Callbacks(progress=progress))
    if result.status != "done":
        raise SystemExit(f"training ended with {result.status}: {result.message}")
    out["scaling"] = [(n, *ours_optimizer_bytes(cfg, model, n)) for n in (1, 4, 16, 75)]
    return out


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    torch.manual_seed(0)
    model = common.build_model(args)
    widths = model.slots()
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(args, model, Path(tmp))
    print(f"machine: {common.machine()}")
    print(f"model: {args.family} {args.size}, {m['res']} px, batch {args.batch}, {args.vectors} vectors, "
          f"widths {widths}, precision {args.precision}, checkpointing {args.checkpointing}, device {args.device}")
    how = "CUDA allocator peak" if model.device.type == "cuda" else "CPU profiler allocation log"
    print(f"step peak: {how}, above what was allocated before the step; weights excluded")
    print(f"{'':22}{'persistent':>14}{'step peak':>14}{'total':>14}{'optim+grad':>14}")
    totals = {}
    for key, name in (("floor", "(a) floor"), ("ours", "(b) ours"), ("table", "(c) full table")):
        keep, peak = m[key]
        totals[key] = keep + peak
        og = {"floor": None, "ours": m["ours_opt"], "table": m["table_opt"]}[key]
        og_s = common.human(sum(og)) if og else "-"
        print(f"{name:22}{common.human(keep):>14}{common.human(peak):>14}{common.human(keep + peak):>14}{og_s:>14}")
    print(f"full table / ours, total: {totals['table'] / totals['ours']:.1f}x; optimizer+grad: "
          f"{sum(m['table_opt']) / sum(m['ours_opt']):.0f}x")
    w = sum(widths.values())
    print(f"ours' optimizer+grad bytes by vectors (sum of widths {w}; AdamW: 3 fp32 copies + step counters):")
    for n, opt_b, grad_b in m["scaling"]:
        print(f"  n={n:<3} {opt_b + grad_b:>10} B  = 12 x n x {w} + {opt_b + grad_b - 12 * n * w}")
    if not args.no_real_shapes:
        print(f"optimizer+grad bytes at real widths, vocabulary {VOCAB}, {args.vectors} vectors (AdamW, counted):")
        for fam, ws in (("SD1 (768)", [768]), ("SD2 (1024)", [1024]), ("SDXL (768+1280)", [768, 1280])):
            ours = adamw_bytes([(args.vectors, x) for x in ws])
            full = adamw_bytes([(VOCAB, x) for x in ws])
            print(f"  {fam:16} ours {sum(ours):>9} B   full table {common.human(sum(full))} "
                  f"(+ restore copy {common.human(sum(VOCAB * x * 4 for x in ws))})")
    ratio = totals["ours"] / totals["floor"]
    print(f"extra_peak_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
