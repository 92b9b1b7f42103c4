"""`python -m lib_ti`: inspect and convert embedding files, and train headless.

User errors print one line on stderr and exit 2; other failures exit 1 (set LIB_TI_DEBUG=1 for the
traceback). Nothing here imports training code until `train` runs, so inspect/convert stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Any

from lib_ti import formats

# --to names as the README tells users; "a1111" is our safetensors layout, the one hosts read
TARGETS = {"a1111": "safetensors", "a1111-pt": "a1111-pt", "diffusers": "diffusers"}
EXTENSIONS = {"safetensors": (".safetensors",), "a1111-pt": (".pt", ".bin"), "diffusers": (".safetensors",)}


class UsageError(Exception):
    """Bad command line: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage plus the error and exits itself; we want one line and our exit codes
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lib_ti", description="Textual Inversion embeddings: inspect, convert, train.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ins = sub.add_parser("inspect", help="show family, vectors, widths, norms, step and metadata of a file")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print the details as JSON")
    ins.add_argument("--name", help="which embedding of a LoRA bundle to show")

    conv = sub.add_parser("convert", help="rewrite an embedding in another layout")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--to", required=True, choices=sorted(TARGETS),
                      help="a1111: safetensors the WebUIs read (SDXL too); a1111-pt: A1111's .pt; "
                           "diffusers: {token: tensor} (SDXL as a _2 file pair)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    conv.add_argument("--token", help="diffusers: the placeholder token (default: the embedding's name)")
    conv.add_argument("--name", help="which embedding of a LoRA bundle to convert")

    tr = sub.add_parser("train", help="train an embedding on a local checkpoint file (.safetensors/.ckpt) or diffusers model folder")
    tr.add_argument("--config_file", help="TOML with kohya-style (or InvokeAI) option names")
    tr.add_argument("--dataset_config", help="TOML dataset description (kohya layout)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one option (repeatable)")
    return p


def _fmt_table(info: dict[str, Any]) -> str:
    width = info["width"]
    widths = " + ".join(f"{k} {v}" for k, v in width.items()) if isinstance(width, dict) else str(width)
    rows = [("file", " + ".join(info["files"])), ("format", info["format"]), ("family", info["family"]),
            ("name", info["name"]), ("step", info["step"]), ("vectors", info["num_vectors"]),
            ("width", widths), ("sd_checkpoint", info["sd_checkpoint"]),
            ("sd_checkpoint_name", info["sd_checkpoint_name"])]
    lines = [f"{k:<19} {'-' if v is None else v}" for k, v in rows]
    norms = info["norms"] if isinstance(info["norms"], dict) else {"norm": info["norms"]}
    lines.append("")
    lines.append("vector  " + "".join(f"{slot:>12}" for slot in norms))
    for i in range(info["num_vectors"]):
        lines.append(f"{i:>6}  " + "".join(f"{vals[i]:>12.4f}" for vals in norms.values()))
    if info["metadata"]:
        lines.append("")
        lines.append("metadata")
        lines += [f"  {k}: {v}" for k, v in sorted(info["metadata"].items())]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = formats.inspect_embedding(args.file, name=args.name)
    print(json.dumps(info, indent=2) if args.json else _fmt_table(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    fmt = TARGETS[args.to]
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in EXTENSIONS[fmt]:
        # hosts pick the loader by extension, so a mismatch would make the file unreadable there
        raise UsageError(f"--to {args.to} writes {' or '.join(EXTENSIONS[fmt])} files, not {args.output!r}")
    emb = formats.read_embedding(args.input, name=args.name)
    written = formats.save_embedding(emb, args.output, fmt, overwrite=args.overwrite, token=args.token)
    print(f"wrote {' + '.join(written)} ({emb.family}, {emb.num_vectors} vectors, {args.to})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from lib_ti import train_cli
    except ModuleNotFoundError as e:
        return _fail(f"the train command is not available in this install ({e})", 1)
    return int(train_cli.main(args) or 0)


COMMANDS = {"inspect": cmd_inspect, "convert": cmd_convert, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except (UsageError, formats.FormatError) as e:
        return _fail(str(e), 2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        return _fail(f"{e.strerror}: {e.filename}", 2)
    except ModuleNotFoundError as e:
        return _fail(f"missing Python package {e.name!r} ({e})", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if os.environ.get("LIB_TI_DEBUG"):
            traceback.print_exc()
        return _fail(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} (set LIB_TI_DEBUG=1 for details)", 1)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
