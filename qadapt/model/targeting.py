"""Which modules of a model get adapters.

A target pattern is one of:

* ``"all-linear"``: every linear layer (a float ``nn.Linear`` or a layer some installed backend
  owns), except the model's output head (``model.get_output_embeddings()``, or a module named
  ``lm_head``). Name the head explicitly to include it: ``["all-linear", "lm_head"]``.
* ``"re:<regex>"`` or a compiled ``re.Pattern``: the fully-qualified module names it matches in
  full (``re.fullmatch``).
* any other string: an exact fully-qualified name (``model.layers.0.self_attn.q_proj``) or a name
  suffix at a dot boundary (``q_proj``, ``self_attn.q_proj``).

``exclude`` takes the same patterns (except ``"all-linear"``) and wins over ``targets``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from qadapt.config import ALL_LINEAR, REGEX_PREFIX
from qadapt.errors import ConfigError, TargetError, clip, shorten

#: Names that mark an output head when the model does not say which module it is.
HEAD_NAMES = ("lm_head",)

TargetPattern = str | re.Pattern[str]
Targets = TargetPattern | Sequence[TargetPattern]


@dataclass(frozen=True)
class _Matcher:
    text: str
    regex: re.Pattern[str] | None

    def matches(self, name: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return name == self.text or name.endswith("." + self.text)


def as_pattern_list(patterns: Targets | None, field: str) -> list[TargetPattern]:
    """``patterns`` as a list (one string or regex becomes a list of one)."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    if not isinstance(patterns, Sequence):
        raise ConfigError(f"{field} must be a string, a regex or a list of them, got {type(patterns).__name__}")
    return list(patterns)


def _compile(pattern: TargetPattern, field: str) -> _Matcher:
    if isinstance(pattern, re.Pattern):
        return _Matcher(pattern.pattern, pattern)
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field} entries must be non-empty strings or regexes, got {shorten(pattern)}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            return _Matcher(pattern, re.compile(pattern[len(REGEX_PREFIX) :]))
        except re.error as exc:
            raise ConfigError(f"{field}: invalid regular expression {shorten(pattern)}: {exc}") from exc
    return _Matcher(pattern, None)


#: Attributes under which torch's wrappers hold the module they wrap (``torch.compile``, FSDP,
#: activation checkpointing); they are no part of a layer's canonical name.
WRAPPER_ATTRS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_names(model: nn.Module) -> dict[str, str]:
    """``{name in model: canonical name}`` for every module: wrapper segments removed.

    ``_orig_mod.model.layers.0.q_proj`` (a ``torch.compile``d model) and ``module.model...`` (in
    ``DistributedDataParallel`` / ``DataParallel``) are both ``model.layers.0.q_proj``, so a
    checkpoint saved from one loads onto the other.
    """
    names: dict[str, str] = {}
    stack: list[tuple[nn.Module, str, str]] = [(model, "", "")]
    seen: set[int] = set()
    while stack:
        module, actual, canonical = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        names[actual] = canonical
        parallel = isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        for attr, child in reversed(list(module._modules.items())):
            if child is None:
                continue
            skip = attr in WRAPPER_ATTRS or (parallel and attr == "module")
            child_canonical = canonical if skip else (f"{canonical}.{attr}" if canonical else attr)
            stack.append((child, f"{actual}.{attr}" if actual else attr, child_canonical))
    return names


def output_head_names(model: nn.Module) -> set[str]:
    """Fully-qualified names of the model's output head(s), left out by ``"all-linear"``."""
    heads: set[str] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def select_targets(
    model: nn.Module,
    targets: Targets,
    exclude: Targets | None,
    is_linear: Callable[[nn.Module], bool],
    is_wrapped: Callable[[nn.Module], bool],
) -> list[tuple[str, nn.Module]]:
    """The ``(fully-qualified name, module)`` pairs to wrap, in model order.

    Patterns match a module's name in ``model`` or its canonical name (see :func:`canonical_names`),
    so ``model.layers.0.q_proj`` also names that layer in a ``torch.compile``d model.

    ``is_linear`` says whether a module can take an adapter; ``is_wrapped`` marks modules that
    already are adapter layers (their inner modules are never targets).

    Raises:
        TargetError: nothing matched (the message lists the closest module names), or a pattern
            matched a module that is not a linear layer or already has adapters.
    """
    target_list = as_pattern_list(targets, "targets")
    if not target_list:
        raise ConfigError("targets must name at least one module (or be 'all-linear')")
    all_linear = ALL_LINEAR in target_list
    matchers = [_compile(p, "targets") for p in target_list if p != ALL_LINEAR]
    excluders = [_compile(p, "exclude") for p in as_pattern_list(exclude, "exclude")]
    heads = output_head_names(model) if all_linear else set()

    chosen: list[tuple[str, nn.Module]] = []
    problems: list[str] = []
    wrapped_prefixes: list[str] = []
    canonical = canonical_names(model)
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped_prefixes):
            continue
        wrapped = is_wrapped(module)
        if wrapped:
            wrapped_prefixes.append(name + ".")
        # A pattern may name the module as it is (``_orig_mod.model.x``) or canonically (``model.x``).
        names = {name, canonical[name]}
        if not name or any(m.matches(n) for m in excluders for n in names):
            continue
        named = any(m.matches(n) for m in matchers for n in names)
        if not named and not (all_linear and name not in heads and not wrapped and is_linear(module)):
            continue
        if wrapped:
            problems.append(f"{name} already has adapters (use qadapt.add_adapter to add another)")
        elif not is_linear(module):
            problems.append(f"{name} is a {type(module).__name__}, not a linear layer")
        else:
            chosen.append((name, module))
    if problems:
        raise TargetError("cannot wrap these modules: " + "; ".join(problems))
    if not chosen:
        raise TargetError(_no_match_message(model, target_list, is_linear))
    return chosen


def _no_match_message(model: nn.Module, patterns: Iterable[TargetPattern], is_linear: Callable) -> str:
    linear_names = [name for name, module in model.named_modules() if name and is_linear(module)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    shown = [p.pattern if isinstance(p, re.Pattern) else p for p in patterns]
    close: list[str] = []
    for pattern in shown:
        tail = pattern.rsplit(".", 1)[-1]
        for candidate in difflib.get_close_matches(tail, leaves, n=3, cutoff=0.4):
            if candidate not in close:
                close.append(candidate)
    message = f"no module matched targets {clip(str(shown), 200)}"
    if close:
        message += f"; closest module names: {', '.join(close)}"
    if linear_names:
        message += f". Linear layers in this model end in: {', '.join(leaves[:20])}"
        message += f" (e.g. {linear_names[0]})"
    else:
        message += ". This model has no linear layer that an installed backend can adapt"
    return message


def name_filter(targets: Targets | None, exclude: Targets | None) -> Callable[[str], bool]:
    """A predicate on fully-qualified names: matched by ``targets`` (None or ``"all-linear"``: all) and not excluded."""
    patterns = as_pattern_list(targets, "targets")
    everything = not patterns or ALL_LINEAR in patterns
    matchers = [_compile(p, "targets") for p in patterns if p != ALL_LINEAR]
    excluders = [_compile(p, "exclude") for p in as_pattern_list(exclude, "exclude")]

    def keep(*names: str) -> bool:
        """True when any of ``names`` (a module's name, its canonical name) is matched and none excluded."""
        if any(m.matches(name) for m in excluders for name in names):
            return False
        return everything or any(m.matches(name) for m in matchers for name in names)

    return keep
