"""Export into a whole-model file: BASE a file a backend opens (a ``.gguf``), OUT the same kind of file.

The backend that declares BASE's suffix (``Backend.model_file_suffixes``) streams the file
(``Backend.write_model_file``) and hands every linear layer it holds to :func:`_rewriter`, which merges
the adapter with the same engine as every other merge (:func:`qadapt.merging.engine.merge_storage`:
keep-state by default, calibrated when per-layer statistics are given) and returns the layer in its own
format. Everything the backend is not handed back is copied byte for byte. OUT is written to a temporary
file beside it and linked into place only when complete: a failed export leaves no OUT file (and an
existing OUT as it was); what a killed export left beside OUT is removed by the next export to it.
"""

from __future__ import annotations

import glob
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qadapt.errors import CheckpointError, ConfigError
from qadapt.exporting.adapter_source import AdapterSource, read_adapter_source
from qadapt.formats.local_files import InputDirectory
from qadapt.merging.engine import check_requantize_mode, merge_storage, merged_bias
from qadapt.merging.result import MergeResult
from qadapt.protocols import Backend, CalibrationStats, LayerRewrite, Method, QuantizedWeight
from qadapt.registry.model_files import model_file_backend

#: float32 copies of a layer a keep-state merge holds at once (W, W', the stored and fresh candidates, figures).
_F32_COPIES = 6


def _check_out(base: Path, adapter: Path, out: Path, overwrite: bool) -> None:
    """OUT: a file path with BASE's suffix, not BASE, not inside ADAPTER; an existing OUT only with ``overwrite``."""
    if out.suffix.lower() != base.suffix.lower():
        raise ConfigError(f"OUT {str(out)!r} must be a {base.suffix} file like BASE (the export keeps BASE's format)")
    if out.is_dir() or (out.is_symlink() and not out.exists()):
        raise ConfigError(f"OUT {str(out)!r} is a directory or a dangling link; give a file path")
    real = out.resolve()
    if real == base.resolve():
        raise ConfigError(f"OUT {str(out)!r} is BASE itself; the export never writes its input")
    if real.is_relative_to(adapter.resolve()):
        raise ConfigError(f"OUT {str(out)!r} lies inside ADAPTER {str(adapter)!r}")
    if out.exists() and not overwrite:
        raise ConfigError(f"OUT {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"OUT's folder {str(out.parent)!r} does not exist")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """``tmp`` becomes ``out`` in one step; without ``overwrite`` an OUT that appeared meanwhile is refused."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # atomic and never clobbers
    except FileExistsError:
        raise ConfigError(f"OUT {str(out)!r} appeared while the export ran; nothing was replaced") from None
    except OSError:  # a filesystem without hard links: claim the name, then replace it
        os.close(os.open(out, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, out)


def _remove_stale(out: Path) -> list[str]:
    """Remove what killed exports to ``out`` left beside it (temporary files of processes no longer alive)."""
    removed = []
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.qadapt-*-*.tmp"):
        pid = leftover.name.removeprefix(f".{out.name}.qadapt-").split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not leftover.is_file() or leftover.is_symlink():
            continue
        leftover.unlink(missing_ok=True)
        removed.append(f"removed {leftover.name}, left beside OUT by an export that was killed (process {pid})")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shared(source: AdapterSource, layers: Mapping[str, tuple[int, int]]) -> nn.Module | None:
    if type(source.method).create_shared is Method.create_shared:
        return None
    return source.create_shared([layers[name] for name in source.layers])


def _check_layers(source: AdapterSource, layers: Mapping[str, tuple[int, int]], base: Path) -> None:
    missing = [name for name in source.layers if name not in layers]
    if missing:
        raise CheckpointError(
            f"the adapter in {source.directory} adapts {len(missing)} layer(s) that {str(base)!r} holds in no "
            f"quantized linear (e.g. {missing[0]}); its layers look like {next(iter(layers), '(none)')}"
        )
    for name in source.layers:
        recorded = source.shapes.get(name)
        if recorded is not None and tuple(recorded) != tuple(layers[name]):
            raise CheckpointError(
                f"{name}: the adapter was trained on a layer with (in, out) = {tuple(recorded)}; {str(base)!r} holds "
                f"{tuple(layers[name])}"
            )


def _rewriter(
    backend: Backend,
    source: AdapterSource,
    layers: Mapping[str, tuple[int, int]],
    shared: nn.Module | None,
    stats: Mapping[str, CalibrationStats],
    requantize: str,
    results: dict[str, MergeResult],
    bar: Any,
) -> LayerRewrite:
    adapted = set(source.layers)

    @torch.no_grad()
    def rewrite(
        name: str, storage: QuantizedWeight, bias: torch.Tensor | None
    ) -> tuple[QuantizedWeight, torch.Tensor | None] | None:
        if name not in adapted:
            return None
        method = source.method.for_layer(name)
        adapter = source.adapter_for(name, layers[name], shared, backend, storage, method)
        layer_stats = stats.get(name)
        mode = requantize if layer_stats is not None or requantize != "calibrated" else "keep"
        new, result = merge_storage(
            backend, method, adapter, storage, name=source.name, requantize_mode=mode, stats=layer_stats
        )
        results[name] = result
        bar.update(1)
        new_bias = None if result.reverted else merged_bias(method, adapter, bias, name=source.name)
        return new, new_bias

    return rewrite


def export_model_file(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    requantize: str | None = None,
    calibration_stats: Mapping[str, CalibrationStats] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """Merge ``adapter`` into the model file ``base`` and write ``out`` in the same format (see the module docstring).

    ``calibration_stats``: per-layer input statistics (``{module name: CalibrationStats}``); those layers are
    requantized calibrated (``requantize`` defaults to ``"calibrated"`` then, else to ``"keep"``).
    Returns an :class:`~qadapt.exporting.run.ExportReport` (``target``: the backend's name).

    Raises:
        ConfigError: no backend opens BASE's suffix, a bad OUT, a bad requantize mode.
        CheckpointError: a damaged or hostile BASE or ADAPTER, an adapter that does not fit BASE.
    """
    from qadapt.exporting.run import ExportReport  # run imports this module

    started = time.perf_counter()
    stats = dict(calibration_stats or {})
    mode = requantize or ("calibrated" if stats else "keep")
    check_requantize_mode(mode)
    base_path, out_path = Path(base), Path(out)
    backend = model_file_backend(base_path, "BASE")
    adapter_dir = InputDirectory(adapter, "ADAPTER")
    _check_out(base_path, adapter_dir.real, out_path, overwrite)
    source = read_adapter_source(adapter_dir)
    layers = backend.model_file_layers(base_path)
    _check_layers(source, layers, base_path)
    unknown = sorted(set(stats) - set(source.layers))
    if unknown:
        raise ConfigError(f"calibration statistics for layers the adapter does not adapt: {', '.join(unknown[:5])}")
    shared = _shared(source, layers)
    results: dict[str, MergeResult] = {}
    recovered = _remove_stale(out_path)
    tmp = out_path.parent / f".{out_path.name}.qadapt-{os.getpid()}-{secrets.token_hex(6)}.tmp"
    bar = tqdm(total=len(source.layers), desc="qadapt export", unit="layer", disable=not progress)
    try:
        with open(tmp, "xb") as handle:
            backend.write_model_file(
                base_path, handle, _rewriter(backend, source, layers, shared, stats, mode, results, bar)
            )
            handle.flush()
            os.fsync(handle.fileno())
        _move_into_place(tmp, out_path, overwrite)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    largest = max((i * o for i, o in layers.values()), default=0)
    peak = largest * 4 * _F32_COPIES
    return ExportReport(
        str(out_path),
        backend.name,
        str(adapter_dir),
        results,
        [out_path.name],
        out_path.stat().st_size,
        time.perf_counter() - started,
        peak,
        peak,
        largest * 4,
        recovered=recovered,
    )
