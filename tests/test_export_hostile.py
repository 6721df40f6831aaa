"""The export as a security boundary: a catalogue of hostile BASE and ADAPTER directories and OUT paths.

Every row copies a tiny base and adapter into the test's directory, damages them, records the whole
tree (every file's bytes, every symlink's target, every special file's kind), runs ``export`` while
an audit hook records every file Python opens, and checks:

* the exact error class and the key words of its message (the file, the field, what is valid);
* the tree is exactly as it was: BASE, ADAPTER, the files outside them and any earlier OUT, and
  nothing was left beside OUT;
* nothing outside BASE and ADAPTER was opened (the secret beside them, ``/proc/self/environ``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import perturb_adapters, tiny_llama
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import qadapt
from qadapt.errors import CheckpointError, ConfigError, QAdaptError
from qadapt.exporting import export

NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
SECRET = b"AWS_SECRET_ACCESS_KEY=hunter2-outside-base\n"

# ------------------------------------------------------------------------------- files Python opens

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opened_during(call: Callable[[], object]) -> tuple[list[str], BaseException | None]:
    """Every path Python opened while ``call`` ran, and the exception it raised (or None)."""
    global _OPENED
    _OPENED = []
    error = None
    try:
        call()
    except BaseException as exc:  # handed back to the test
        error = exc
    finally:
        paths, _OPENED = _OPENED, None
    return paths, error


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (not following links): a file's SHA-256, a link's target, a kind."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            mode = path.lstat().st_mode
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                state[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISDIR(mode):
                state[rel] = "dir"
            else:
                state[rel] = f"special:{stat.S_IFMT(mode)}"
    return state


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases (float, nf4, int8 as transformers saves them) and adapters (qadapt OFT and LoRA, PEFT LoRA)."""
    root = tmp_path_factory.mktemp("sources")
    tiny_llama().save_pretrained(root / "float")
    (root / "float" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n', encoding="utf-8")
    for name, quantization in (("nf4", NF4), ("int8", BitsAndBytesConfig(load_in_8bit=True))):
        model = LlamaForCausalLM.from_pretrained(
            root / "float", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
        model.save_pretrained(root / name)
    for method, options in (("oft", {"block_size": 16}), ("lora", {"r": 4})):
        model = qadapt.wrap(tiny_llama(), method=method, backend="none", method_options=options)
        perturb_adapters(model)
        qadapt.save_adapter(model, root / method)
        if method == "lora":
            qadapt.save_peft_adapter(model, root / "peft")
    return {p.name: p for p in root.iterdir()}


@dataclass
class Where:
    """The paths of one case: BASE and ADAPTER (copies), a directory beside them, OUT."""

    root: Path
    base: Path
    adapter: Path
    outside: Path
    out: Path


@dataclass(frozen=True)
class Case:
    id: str
    damage: Callable[[Where], None]
    error: type[Exception]
    #: regexes that must all be found in the message
    words: tuple[str, ...]
    base: str = "float"
    adapter: str = "oft"
    #: export keywords (to= defaults to bf16); callables of Where are resolved first
    kwargs: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- damages


def nothing(w: Where) -> None:
    pass


def link(name: str, target: Callable[[Where], Path | str], where: str = "base") -> Callable[[Where], None]:
    def damage(w: Where) -> None:
        path = getattr(w, where) / name
        path.unlink(missing_ok=True)
        os.symlink(target(w), path)

    return damage


def moved_out(name: str, where: str = "base") -> Callable[[Where], None]:
    """``name`` moved beside the input and replaced by a symlink to it (a link out of the directory)."""

    def damage(w: Where) -> None:
        source = getattr(w, where) / name
        moved = w.outside / name
        shutil.move(source, moved)
        os.symlink(moved, source)

    return damage


def fifo(name: str, where: str = "base") -> Callable[[Where], None]:
    def damage(w: Where) -> None:
        path = getattr(w, where) / name
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return damage


def index(weight_map: Callable[[Where], object], raw: bytes | None = None) -> Callable[[Where], None]:
    """Replace the single file by an index whose ``weight_map`` is given (``raw``: the index's bytes)."""

    def damage(w: Where) -> None:
        data = raw if raw is not None else json.dumps({"weight_map": weight_map(w)}).encode()
        (w.base / "model.safetensors.index.json").write_bytes(data)

    return damage


def every_key_to(name: Callable[[Where], str], move: bool = True) -> Callable[[Where], object]:
    def weight_map(w: Where) -> dict[str, str]:
        keys = list(load_file(w.base / "model.safetensors"))
        target = name(w)
        if move:
            shutil.move(w.base / "model.safetensors", w.outside / "model.safetensors")
        return dict.fromkeys(keys, target)

    return weight_map


def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def header(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes] | None]) -> Callable[[Where], None]:
    """Edit the base's one safetensors header (and data) in place: ``edit(header, data)``."""

    def damage(w: Where) -> None:
        path = w.base / "model.safetensors"
        head, data = read_raw(path)
        result = edit(head, data)
        write_raw(path, *(result if result is not None else (head, data)))

    return damage


def set_entry(key: str, **changes: object) -> Callable[[dict, bytes], None]:
    def edit(head: dict, data: bytes) -> None:
        head[key].update(changes)

    return edit


def duplicate_key(head: dict, data: bytes) -> tuple[bytes, bytes]:
    text = json.dumps(head)
    entry = json.dumps({"model.norm.weight": head["model.norm.weight"]})[1:-1]
    return ("{" + entry + ", " + text[1:]).encode(), data


def tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Where], None]:
    """Load the base's one file, let ``edit`` change its tensors, and save it back (metadata kept)."""

    def damage(w: Where) -> None:
        path = w.base / "model.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        loaded = load_file(path)
        edit(loaded)
        save_file(loaded, path, metadata=metadata)

    return damage


def two_shards(second: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], mapped: str) -> Callable:
    """Split into a.safetensors (everything) and b.safetensors (``second(tensors)``), index mapping to ``mapped``."""

    def damage(w: Where) -> None:
        loaded = load_file(w.base / "model.safetensors")
        save_file(loaded, w.base / "a.safetensors", metadata={"format": "pt"})
        save_file(second(loaded), w.base / "b.safetensors", metadata={"format": "pt"})
        (w.base / "model.safetensors").unlink()
        weight_map = dict.fromkeys(loaded, "a.safetensors")
        weight_map["zzz.in.b"] = "b.safetensors"
        if mapped != "a.safetensors":
            weight_map["model.norm.weight"] = mapped
        (w.base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return damage


def q_state(edit: Callable[[dict], None]) -> Callable[[dict[str, torch.Tensor]], None]:
    """Edit the plain fields (JSON) of q_proj's 4-bit quant state."""

    def change(t: dict[str, torch.Tensor]) -> None:
        key = next(k for k in t if k.startswith(Q_PROJ + ".quant_state"))
        fields = json.loads(bytes(t[key].tolist()))
        edit(fields)
        t[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)

    return change


def config(edit: Callable[[dict], object]) -> Callable[[Where], None]:
    def damage(w: Where) -> None:
        path = w.base / "config.json"
        data = json.loads(path.read_text())
        result = edit(data)
        path.write_text(json.dumps(data if result is None else result))

    return damage


def raw_config(data: bytes) -> Callable[[Where], None]:
    def damage(w: Where) -> None:
        (w.base / "config.json").write_bytes(data)

    return damage


def earlier_out(w: Where) -> None:
    w.out.mkdir()
    (w.out / "keep.txt").write_text("mine")


def q_rows(rows: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[Q_PROJ] = torch.randn(rows, 64)

    return change


OUTSIDE = r"outside BASE"
CATALOGUE: list[Case] = [
    # ---- paths out of BASE and ADAPTER (symlinks, index entries, special files)
    Case("side-file-symlink-out", link("tokenizer.json", lambda w: w.outside / "secret.txt"), CheckpointError,
         (r"tokenizer\.json is a symlink to .*secret\.txt", OUTSIDE)),
    Case("side-file-symlink-proc-environ", link("special_tokens_map.json", lambda w: "/proc/self/environ"),
         CheckpointError, (r"special_tokens_map\.json is a symlink to /proc/", OUTSIDE)),
    Case("side-file-relative-symlink-out", link("vocab.json", lambda w: "../../outside/secret.txt"), CheckpointError,
         (r"vocab\.json is a symlink to", OUTSIDE)),
    Case("side-file-fifo", fifo("tokenizer.json"), CheckpointError, (r"tokenizer\.json is a FIFO", "regular files")),
    Case("side-file-directory", lambda w: (w.base / "vocab.json").mkdir(), CheckpointError,
         (r"vocab\.json is a directory",)),
    Case("weights-symlink-out", moved_out("model.safetensors"), CheckpointError, (r"model\.safetensors is a symlink",
                                                                                   OUTSIDE)),
    Case("weights-fifo", fifo("model.safetensors"), CheckpointError, (r"model\.safetensors is a FIFO",)),
    Case("config-symlink-out", moved_out("config.json"), CheckpointError, (r"config\.json is a symlink", OUTSIDE)),
    Case("index-dotdot", index(every_key_to(lambda w: "../outside/model.safetensors")), CheckpointError,
         (r"weight_map\['.*'\] must name a file inside BASE", r"without '\.\.'", r"\.\./outside")),
    Case("index-absolute", index(every_key_to(lambda w: str(w.outside / "model.safetensors"))), CheckpointError,
         (r"weight_map\['.*'\] must name a file inside BASE",)),
    Case("index-shard-symlink-out",
         lambda w: (index(every_key_to(lambda _: "shard.safetensors"))(w),
                    os.symlink(w.outside / "model.safetensors", w.base / "shard.safetensors")),
         CheckpointError, (r"shard\.safetensors is a symlink", OUTSIDE)),
    Case("index-value-int", index(lambda w: {"a": 5}), CheckpointError, (r"weight_map\['a'\] must be a file name",
                                                                          "got 5")),
    Case("index-weight-map-list", index(lambda w: ["model.safetensors"]), CheckpointError,
         (r"field 'weight_map' must map tensor names to shard files", r"got \['model\.safetensors'\]")),
    Case("index-names-config", index(lambda w: {"a": "config.json"}), CheckpointError,
         (r"must name a \.safetensors file", "config.json")),
    Case("index-not-utf8", index(None, raw=b'{"weight_map": {"a": "\xff.safetensors"}}'), CheckpointError,
         (r"index\.json is not UTF-8",)),
    Case("index-not-json", index(None, raw=b'{"weight_map": '), CheckpointError, (r"index\.json is not valid JSON",)),
    Case("adapter-weights-symlink-out", moved_out("qadapt_adapter.safetensors", "adapter"), CheckpointError,
         (r"qadapt_adapter\.safetensors is a symlink", "outside the checkpoint directory")),
    Case("adapter-config-fifo", fifo("qadapt_config.json", "adapter"), CheckpointError,
         (r"qadapt_config\.json is a FIFO",)),
    Case("peft-weights-symlink-out", moved_out("adapter_model.safetensors", "adapter"), CheckpointError,
         (r"adapter_model\.safetensors is a symlink", "outside ADAPTER"), adapter="peft"),
    Case("peft-config-symlink-proc", link("adapter_config.json", lambda w: "/proc/self/environ", "adapter"),
         CheckpointError, (r"adapter_config\.json is a symlink to /proc/", "outside ADAPTER"), adapter="peft"),
    # ---- lying safetensors headers (every check safetensors makes, and a key given twice)
    Case("header-overlap", header(set_entry("model.norm.weight", data_offsets=[0, 256])), CheckpointError,
         (r"model\.safetensors is not a readable safetensors file", "overlaps")),
    Case("header-offset-into-header", header(set_entry("model.norm.weight", data_offsets=[-256, 0])),
         CheckpointError, (r"data_offsets must be \[begin, end\] with 0 <= begin <= end",)),
    Case("header-dtype-lies", header(set_entry("model.norm.weight", dtype="F16")), CheckpointError,
         (r"'model\.norm\.weight' holds 256 bytes, but F16 \[64\] needs 128",)),
    Case("header-shape-lies", header(set_entry("model.norm.weight", shape=[128])), CheckpointError,
         (r"holds 256 bytes, but F32 \[128\] needs 512",)),
    Case("header-huge-shape", header(set_entry(Q_PROJ, shape=[2**40, 2**40])), CheckpointError,
         (r"q_proj\.weight'\.shape \[1099511627776, 1099511627776\] overflows a 64-bit element count",)),
    Case("header-unknown-dtype", header(set_entry("model.norm.weight", dtype="F4_E2M1")), CheckpointError,
         (r"dtype must be one of the safetensors dtype codes \(BOOL, F4", "got 'F4_E2M1'")),
    Case("header-sub-byte-fraction", header(set_entry("model.norm.weight", dtype="F4", shape=[3])), CheckpointError,
         (r"F4 \[3\] is 12 bits, not a whole number of bytes",)),
    Case("header-duplicate-key", header(duplicate_key), CheckpointError, (r"names 'model\.norm\.weight' twice",)),
    Case("header-metadata-list", header(lambda h, d: h.update({"__metadata__": []})), CheckpointError,
         (r"'__metadata__' must map names to strings, got \[\]",)),
    Case("header-entry-not-object", header(lambda h, d: h.update({"junk": "x"})), CheckpointError,
         (r"header field 'junk' must be an object with dtype, shape and data_offsets",)),
    Case("header-huge-length", lambda w: _patch(w.base / "model.safetensors", struct.pack("<Q", 2**62)),
         CheckpointError, (r"its header length field says 4611686018427387904 bytes",)),
    Case("header-shape-a-string", header(set_entry("model.norm.weight", shape="64")), CheckpointError,
         (r"shape must be a list of non-negative integers, got '64'",)),
    Case("key-in-two-shards", two_shards(lambda t: {"model.norm.weight": torch.zeros(64)}, "a.safetensors"),
         CheckpointError, (r"'model\.norm\.weight' is in two shards, a\.safetensors and b\.safetensors",)),
    Case("index-maps-key-to-a-shard-without-it",
         two_shards(lambda t: {"zzz.in.b": torch.zeros(2)}, "b.safetensors"), CheckpointError,
         (r"'model\.norm\.weight' is in shard a\.safetensors, but model\.safetensors\.index\.json maps it to "
          r"'b\.safetensors'",)),
    Case("shard-holds-a-key-the-index-does-not-list",
         two_shards(lambda t: {"zzz.in.b": torch.zeros(2), "extra.weight": torch.zeros(2)}, "a.safetensors"),
         CheckpointError, (r"'extra\.weight' is in shard b\.safetensors, but .* does not list it",)),
    # ---- adapters for other shapes
    Case("lora-on-a-shorter-q-proj", tensors(q_rows(32)), CheckpointError,
         (r"model\.layers\.0\.self_attn\.q_proj: the adapter was trained on a layer with in_features=64, "
          r"out_features=64; the base's layer has in_features=64, out_features=32", "nothing was written"),
         adapter="lora"),
    Case("lora-on-a-longer-q-proj-to-nf4", tensors(q_rows(128)), CheckpointError,
         (r"out_features=64; the base's layer has in_features=64, out_features=128",), adapter="lora",
         kwargs={"to": "nf4"}),
    Case("oft-on-a-shorter-q-proj", tensors(q_rows(32)), CheckpointError, (r"the base's layer has .*out_features=32",)),
    Case("peft-lora-on-a-shorter-q-proj", tensors(q_rows(32)), CheckpointError,
         (r"q_proj\.lora_B\.weight has shape \(64, 4\) in the file; an adapter .* on this 64 -> 32 layer holds "
          r"\(32, 4\)", "nothing was written"), adapter="peft"),
    Case("nf4-quant-state-shape-lies", tensors(q_state(lambda f: f.update(shape=[128, 32]))), CheckpointError,
         (r"the base's layer has in_features=32, out_features=128",), base="nf4"),
    # ---- OUT: never an input, never inside or around one, never a file
    Case("out-is-base", nothing, ConfigError, (r"is BASE", "never writes over its inputs"),
         kwargs={"out": lambda w: w.base, "overwrite": True}),
    Case("out-is-adapter", nothing, ConfigError, (r"is ADAPTER",), kwargs={"out": lambda w: w.adapter,
                                                                           "overwrite": True}),
    Case("out-inside-base", nothing, ConfigError, (r"is inside BASE",), kwargs={"out": lambda w: w.base / "merged"}),
    Case("out-contains-base", nothing, ConfigError, (r"contains BASE", "would delete an input"),
         kwargs={"out": lambda w: w.base.parent, "overwrite": True}),
    Case("out-symlink-to-adapter", lambda w: os.symlink(w.adapter, w.out), ConfigError, (r"is ADAPTER",),
         kwargs={"overwrite": True}),
    Case("out-a-file", lambda w: w.out.write_text("a file"), ConfigError,
         (r"exists and is not a directory", "never a file"), kwargs={"overwrite": True}),
    Case("out-dangling-symlink", lambda w: os.symlink(w.root / "nowhere", w.out), ConfigError,
         (r"exists; pass overwrite=True",)),
    Case("out-exists", earlier_out, ConfigError, (r"exists; pass overwrite=True",)),
    Case("out-kept-when-the-base-is-bad", lambda w: (earlier_out(w), header(duplicate_key)(w)), CheckpointError,
         (r"twice",), kwargs={"overwrite": True}),
    # ---- config.json
    Case("config-not-utf8", raw_config(b'{"model_type": "llama\xff"}'), CheckpointError,
         (r"config\.json is not UTF-8 text",)),
    Case("config-a-list", raw_config(b"[1, 2]"), CheckpointError, (r"config\.json must hold a JSON object, got list",)),
    Case("config-missing", lambda w: (w.base / "config.json").unlink(), CheckpointError,
         (r"has no readable config\.json", "is missing")),
    Case("quantization-config-a-string", config(lambda c: c.update(quantization_config="nf4")), CheckpointError,
         (r"field 'quantization_config' must be an object, got 'nf4'",)),
    Case("architectures-pipeline", config(lambda c: c.update(architectures=["pipeline"])), CheckpointError,
         (r"'architectures\[0\]' is 'pipeline', which is not a transformers model class",), kwargs={"to": "nf4"}),
    Case("architectures-auto-class", config(lambda c: c.update(architectures=["AutoModelForCausalLM"])),
         CheckpointError, (r"is 'AutoModelForCausalLM', which is not a transformers model class",),
         kwargs={"to": "nf4"}),
    Case("architectures-a-number", config(lambda c: c.update(architectures=[123])), CheckpointError,
         (r"'architectures\[0\]' must name a model class such as 'LlamaForCausalLM', got 123",), kwargs={"to": "nf4"}),
    Case("model-type-unknown-remote-code",
         config(lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})),
         CheckpointError, (r"field 'model_type' must be a model type transformers .* knows", "got 'evil'",
                           "remote"), kwargs={"to": "nf4"}),
    # ---- sizes
    Case("max-memory-overflows", nothing, ConfigError, (r"max_memory must be a positive size", "got '1e400'"),
         kwargs={"max_memory": "1e400"}),
    Case("max-memory-a-bool", nothing, ConfigError, (r"max_memory must be a positive size", "got True"),
         kwargs={"max_memory": True}),
    Case("max-shard-size-overflows", nothing, ConfigError, (r"max_shard_size must be a positive size",),
         kwargs={"max_shard_size": "1e400"}),
    # ---- quantized layers checked against their declared shape and format before any dequantize
    Case("nf4-absmax-short", tensors(lambda t: t.update({Q_PROJ + ".absmax": t[Q_PROJ + ".absmax"][:3].clone()})),
         CheckpointError, (r"layer model\.layers\.0\.self_attn\.q_proj \(bnb4\)",
                           r"weight\.absmax must hold 64 values for this layer, got 3"), base="nf4"),
    Case("nf4-absmax-short-to-nf4",
         tensors(lambda t: t.update({Q_PROJ + ".absmax": t[Q_PROJ + ".absmax"][:3].clone()})), CheckpointError,
         (r"weight\.absmax must hold 64 values",), base="nf4", kwargs={"to": "nf4"}),
    Case("nf4-codes-short", tensors(lambda t: t.update({Q_PROJ: t[Q_PROJ][:10].clone()})), CheckpointError,
         (r"weight \(the packed codes\) must hold 2048 uint8 values for shape \[64, 64\], got shape \[10, 1\]",),
         base="nf4"),
    Case("nf4-quant-map-short",
         tensors(lambda t: t.update({Q_PROJ + ".quant_map": t[Q_PROJ + ".quant_map"][:8].clone()})),
         CheckpointError, (r"weight\.quant_map must hold 16 values",), base="nf4"),
    Case("nf4-nested-absmax-empty",
         tensors(lambda t: t.update({Q_PROJ + ".nested_absmax": torch.zeros(0)})), CheckpointError,
         (r"weight\.nested_absmax must hold 1 values",), base="nf4"),
    Case("nf4-nested-absmax-nan",
         tensors(lambda t: t.update({Q_PROJ + ".nested_absmax": torch.full((1,), float("nan"))})), CheckpointError,
         (r"weight\.nested_absmax holds NaN or infinite values",), base="nf4"),
    Case("nf4-quant-state-not-json",
         tensors(lambda t: t.update({next(k for k in t if "quant_state" in k and k.startswith(Q_PROJ)):
                                     torch.tensor(list(b"{not json"), dtype=torch.uint8)})),
         CheckpointError, (r"quant_state\.bitsandbytes__nf4 is not UTF-8 JSON",), base="nf4"),
    Case("nf4-blocksize-lies", tensors(q_state(lambda f: f.update(blocksize=128))), CheckpointError,
         (r"weight\.absmax must hold 32 values for this layer, got 64",), base="nf4"),
    Case("nf4-blocksize-not-allowed", tensors(q_state(lambda f: f.update(blocksize=48))), CheckpointError,
         (r"field 'blocksize' must be one of \(32, 64,", "got 48"), base="nf4"),
    Case("nf4-dtype-names-a-torch-function", tensors(q_state(lambda f: f.update(dtype="load"))), CheckpointError,
         (r"field 'dtype' must be one of \('float32', 'float16', 'bfloat16'\), got 'load'",), base="nf4"),
    Case("nf4-nested-offset-nan", tensors(q_state(lambda f: f.update(nested_offset=float("nan")))), CheckpointError,
         (r"field 'nested_offset' must be a finite number",), base="nf4"),
    Case("int8-scb-short", tensors(lambda t: t.update({Q_PROJ[:-6] + "SCB": t[Q_PROJ[:-6] + "SCB"][:5].clone()})),
         CheckpointError, (r"SCB must be float32 \[64\] \(one scale per row of weight\), got float32 \[5\]",),
         base="int8"),
    Case("int8-scb-negative", tensors(lambda t: t.update({Q_PROJ[:-6] + "SCB": -t[Q_PROJ[:-6] + "SCB"]})),
         CheckpointError, (r"SCB holds negative, NaN or infinite row scales",), base="int8", kwargs={"to": "int8"}),
    Case("int8-weight-format-1",
         tensors(lambda t: t.update({Q_PROJ[:-6] + "weight_format": torch.tensor(1, dtype=torch.uint8)})),
         CheckpointError, (r"weight_format must be 0 \(row-major",), base="int8"),
]  # fmt: skip


def _patch(path: Path, prefix: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[: len(prefix)] = prefix
    path.write_bytes(bytes(data))


def setup_case(sources: dict[str, Path], tmp_path: Path, case: Case) -> Where:
    inputs = tmp_path / "inputs"
    w = Where(tmp_path, inputs / "base", inputs / "adapter", tmp_path / "outside", tmp_path / "out")
    shutil.copytree(sources[case.base], w.base, symlinks=True)
    shutil.copytree(sources[case.adapter], w.adapter, symlinks=True)
    w.outside.mkdir()
    (w.outside / "secret.txt").write_bytes(SECRET)
    case.damage(w)
    return w


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_hostile_export_is_refused_and_changes_nothing(sources: dict[str, Path], tmp_path: Path, case: Case):
    w = setup_case(sources, tmp_path, case)
    kwargs = {"to": "bf16", "progress": False, **case.kwargs}
    kwargs = {k: (v(w) if callable(v) else v) for k, v in kwargs.items()}
    out = kwargs.pop("out", w.out)
    before = tree_state(tmp_path)

    opened, error = opened_during(lambda: export(w.base, w.adapter, out, **kwargs))

    assert isinstance(error, case.error), f"expected {case.error.__name__}, got {error!r}"
    assert isinstance(error, QAdaptError)
    for pattern in case.words:
        assert re.search(pattern, str(error)), f"{pattern!r} not in: {error}"
    assert tree_state(tmp_path) == before, "a file was created, changed or removed"
    inside = [os.path.realpath(w.base), os.path.realpath(w.adapter)]
    own = os.path.join(os.path.realpath(Path(out).parent), f".{Path(out).name}.qadapt-")  # its temporary and lock
    for path in opened:
        real = os.path.realpath(path)
        assert "environ" not in real and not real.startswith(os.path.realpath(w.outside)), f"opened {path}"
        if real.startswith(os.path.realpath(tmp_path)) and not real.startswith(own):
            assert any(real.startswith(p + os.sep) for p in inside), f"opened {path}, outside BASE and ADAPTER"


def test_catalogue_ids_are_unique_and_cover_every_class():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 70
    for prefix in ("side-file", "index", "header", "out-", "config", "nf4", "int8", "peft", "max-"):
        assert any(i.startswith(prefix) for i in ids), prefix


# ------------------------------------------------------------------ what is allowed, and is kept


def test_links_inside_base_and_a_hub_cache_snapshot_are_read_and_other_files_are_left_out(
    sources: dict[str, Path], tmp_path: Path
):
    # A Hugging Face hub cache: snapshots/<revision>/<file> are symlinks into the repository's blobs/.
    repo = tmp_path / "models--tiny--llama"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sources["float"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.name.encode()).hexdigest()
        shutil.copy(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (snapshot / "notes.txt").write_text("not a model file")
    os.mkdir(snapshot / "tok")
    (snapshot / "tok" / "real.json").write_text('{"version": "1.0"}')
    os.symlink("tok/real.json", snapshot / "tokenizer.json")  # a link inside BASE
    before = tree_state(tmp_path)

    report = export(snapshot, sources["oft"], tmp_path / "out", to="bf16", progress=False)

    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer_config.json").is_file() and not (out / "notes.txt").exists()
    assert report.copied_files == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert report.left_out_files == ["notes.txt", "tok"]
    assert "not copied from BASE" in str(report) and "notes.txt" in str(report)
    after = tree_state(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


def _kill_inside_slot(out: Path, parked: bool) -> None:
    """A process that claims an output slot (lock, temporary directory) and is SIGKILLed inside it;
    with ``parked``, right after an overwrite's first rename (the old OUT moved aside)."""
    import subprocess

    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from qadapt.exporting.output import OutputSlot, OLD_TAG, _name\n"
        f"out = Path({str(out)!r})\n"
        "slot = OutputSlot(out).__enter__()\n"
        "(slot.tmp / 'model.safetensors').write_bytes(b'partial')\n"
        f"if {parked}:\n"
        "    parked = _name(out, OLD_TAG, slot.token); parked.mkdir(); os.replace(out, parked / out.name)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("parked", [False, True], ids=["killed-while-writing", "killed-between-the-renames"])
def test_a_killed_export_is_cleaned_up_and_a_parked_out_put_back_by_the_next(
    sources: dict[str, Path], tmp_path: Path, parked: bool
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the earlier export")
    _kill_inside_slot(out, parked)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.qadapt-"))
    assert len(leftovers) == (3 if parked else 2), leftovers  # temporary, lock (and the parked old OUT)
    assert out.exists() != parked

    if parked:  # the next export finds OUT where it was, so it must be told to overwrite it
        with pytest.raises(ConfigError, match="exists; pass overwrite"):
            export(sources["float"], sources["oft"], out, to="bf16", progress=False)
        assert (out / "keep.txt").read_text() == "the earlier export"
        assert not any(p.name.startswith(".out.qadapt-") for p in tmp_path.iterdir())
        _kill_inside_slot(out, parked)
    report = export(sources["float"], sources["oft"], out, to="bf16", progress=False, overwrite=True)

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert any("did not finish" in line for line in report.recovered)
    assert any("put back" in line for line in report.recovered) == parked


def test_a_running_export_is_never_taken_for_stale(tmp_path: Path):
    from qadapt.exporting.output import OutputSlot, recover_stale

    out = tmp_path / "out"
    with OutputSlot(out) as slot:
        (slot.tmp / "x").write_text("in progress")
        assert recover_stale(out) == []
        assert (slot.tmp / "x").is_file()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_symlink_out_not_its_target(sources: dict[str, Path], tmp_path: Path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    os.symlink(target, tmp_path / "out")
    export(sources["float"], sources["oft"], tmp_path / "out", to="bf16", progress=False, overwrite=True)
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious"]
