"""``qadapt export`` against PEFT's ``merge_and_unload`` + ``save_pretrained`` on a ~1B-parameter Llama.

Not part of CI. Everything is built here (nothing is downloaded): a random-weight Llama of about
1.2B parameters (Llama-3.2-1B's shape) written in fp16, and a PEFT OFT adapter on every linear
layer with its rotations moved off the identity. Then, each in its own fresh process:

* PEFT: ``from_pretrained(base, dtype=fp16)``, ``PeftModel.from_pretrained``, ``merge_and_unload``,
  ``save_pretrained``;
* qadapt: ``qadapt.export(base, adapter, out, to="fp16")``.

Reported: wall time of each process (imports included) and of the work alone, each process's
peak RSS (``ru_maxrss``), the ratios qadapt / PEFT, qadapt's peak against the base's largest
tensor, and the largest difference between the two outputs' tensors (a correctness check).

    python benchmarks/export_bench.py            # ~1.2B parameters: ~5 GB RAM, ~8 GB disk, ~15 min on 2 CPUs
    python benchmarks/export_bench.py --size small
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # Llama-3.2-1B's shape: 1.24B parameters, embeddings tied.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
BLOCK_SIZE = 32
RESULTS = Path(__file__).parent / "results" / "export_bench.json"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_build(work: Path, size: str) -> dict:
    """The base model (config + one fp16 safetensors file, written a tensor at a time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qadapt.formats.hf_checkpoint import ShardWriter

    config = LlamaConfig(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=2048, dtype="float16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    base = work / "base"
    base.mkdir(parents=True)
    config.save_pretrained(base)
    writer = ShardWriter(base, 10**12)
    generator = torch.Generator().manual_seed(0)
    count = 0
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if param.dim() == 1:
            tensor = torch.ones(param.shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.float16)
        writer.add(name, tensor)
        count += tensor.numel()
    writer.finish()
    return {"parameters": count}


def child_adapter(work: Path) -> dict:
    """A PEFT OFT adapter on every linear layer, rotations moved off the identity."""
    import torch
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float16)
    model = get_peft_model(model, OFTConfig(r=0, oft_block_size=BLOCK_SIZE, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.02)
    model.save_pretrained(work / "adapter")
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def child_peft(work: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float16)
    model = PeftModel.from_pretrained(model, work / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(work / "out-peft")
    return {"work_s": time.perf_counter() - start}


def child_qadapt(work: Path) -> dict:
    from qadapt.cli.main import main
    from qadapt.exporting import REPORT_FILE

    start = time.perf_counter()
    out = work / "out-qadapt"
    code = main(["export", str(work / "base"), str(work / "adapter"), str(out), "--to", "fp16", "--no-progress"])
    assert code == 0
    report = json.loads((out / REPORT_FILE).read_text())
    return {
        "work_s": time.perf_counter() - start,
        "peak_estimate": report["peak_estimate"],
        "largest_tensor": report["largest_tensor_bytes"],
        "max_memory": report["max_memory"],
        "layers": len(report["layers"]),
    }


def child_compare(work: Path) -> dict:
    """Largest relative difference over the two outputs' tensors (read one at a time)."""

    from qadapt.formats.hf_checkpoint import model_entries, read_tensors
    from qadapt.formats.local_files import InputDirectory

    ours = model_entries(InputDirectory(work / "out-qadapt", "OUT"))
    theirs = model_entries(InputDirectory(work / "out-peft", "OUT"))
    worst, missing = 0.0, sorted(set(theirs) ^ set(ours))
    for key in sorted(set(ours) & set(theirs)):
        a = read_tensors([ours[key]])[key].float()
        b = read_tensors([theirs[key]])[key].float()
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    return {"max_rel_diff": worst, "keys_only_in_one": missing[:5]}


CHILDREN = {"build": child_build, "adapter": child_adapter, "peft": child_peft, "qadapt": child_qadapt}


def run_child(name: str, work: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), TQDM_DISABLE="1")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, "--work", str(work), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    print(f"{name:8s} {wall:7.1f} s  peak RSS {result['peak_rss'] / 2**20:8.0f} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--work", default="/tmp/qadapt-export-bench")
    parser.add_argument("--child", choices=[*CHILDREN, "compare"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--reuse", action="store_true", help="reuse the base and adapter of a kept work directory")
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        fn = {**CHILDREN, "compare": child_compare}[args.child]
        result = fn(work, args.size) if args.child == "build" else fn(work)
        result["peak_rss"] = _peak_rss()
        print(json.dumps(result))
        return
    if args.reuse and (work / "adapter").is_dir():
        for out in ("out-peft", "out-qadapt"):
            shutil.rmtree(work / out, ignore_errors=True)
        built = json.loads((work / "built.json").read_text())
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        built = run_child("build", work, "--size", args.size)
        (work / "built.json").write_text(json.dumps(built))
        run_child("adapter", work)
    peft = run_child("peft", work)
    ours = run_child("qadapt", work)
    compared = run_child("compare", work)
    summary = {
        "size": args.size,
        "parameters": built["parameters"],
        "threads": os.environ.get("OMP_NUM_THREADS", "2"),
        "peft": {k: peft[k] for k in ("wall_s", "work_s", "peak_rss")},
        "qadapt": {k: ours[k] for k in ("wall_s", "work_s", "peak_rss", "peak_estimate", "max_memory")},
        "largest_tensor_bytes": ours["largest_tensor"],
        "ratio_wall": ours["wall_s"] / peft["wall_s"],
        "ratio_work": ours["work_s"] / peft["work_s"],
        "ratio_peak_rss": ours["peak_rss"] / peft["peak_rss"],
        "qadapt_peak_over_largest_tensor": ours["peak_rss"] / ours["largest_tensor"],
        "max_rel_diff_between_outputs": compared["max_rel_diff"],
        "keys_only_in_one": compared["keys_only_in_one"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
