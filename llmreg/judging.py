"""What a judge is, and the one way to name one on a command line.

Two kinds of judges, each a ``typing.Protocol`` that any object with the method satisfies:

- ``PreferenceJudge`` (self-play, ``llmreg.selfplay.judges``): ``preferences(prompts, groups, rows)`` → P of shape
  (N, K, K), P[n, i, j] = P(y_i ≻ y_j | x_n);
- ``HarmfulJudge`` (the fine-tuning-as-a-service pipeline, ``llmreg.ftaas.judges``): ``judge(prompts, completions)``
  → one bool per answer, True where it is harmful.

A judge spec is ``KIND:TARGET`` for both, ``TARGET`` a dotted Python path (``module.function``) or a checkpoint
(``PATH_OR_ID``); the kinds each consumer accepts are its own. A consumer with a default kind also takes a bare
``module.function``.
"""

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PreferenceJudge(Protocol):
    def preferences(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor: ...


@runtime_checkable
class HarmfulJudge(Protocol):
    def __call__(self, prompts: list, completions: list) -> list[bool]: ...


def parse_judge_spec(spec: str, kinds: dict[str, str], default_kind: str | None = None) -> tuple[str, str]:
    """``"KIND:TARGET"`` → (kind, target), ``kinds`` mapping each accepted kind to what its target is (for the error
    message). Without a colon, ``spec`` is the target of ``default_kind`` when there is one."""
    kind, colon, target = spec.partition(":")
    if not colon and default_kind is not None:
        kind, target = default_kind, spec
    if kind not in kinds or not target:
        accepted = ", ".join(f"'{name}:{what}'" for name, what in kinds.items())
        bare = f", or a bare {kinds[default_kind]} ({default_kind})" if default_kind is not None else ""
        raise ValueError(f"Unknown judge {spec!r}: write KIND:TARGET, one of {accepted}{bare}.")
    return kind, target
