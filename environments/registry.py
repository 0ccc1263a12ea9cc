"""Finding environments: the built-in families and third-party packages.

Built-ins register through `gymnasium.register`. A third-party package plugs in with no change
to KPop by declaring an entry point in the group `kpop.environments`; its name is the env id
and its value the gymnasium entry point (a `ChatEnv` subclass or a factory)::

    [project.entry-points."kpop.environments"]
    "acme/triage-v0" = "acme_envs.triage:TriageEnv"

Entry points are read with `importlib.metadata`; the plugin module is imported only when the
env is made, so a broken plugin cannot break `kpop env list`.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

import gymnasium

from environments.core import ChatEnv

ENTRY_POINT_GROUP = "kpop.environments"

BUILTIN: dict[str, str] = {
    "kpop/tooluse-v0": "environments.tooluse:ToolUseEnv",
    "kpop/coding-v0": "environments.coding:CodingEnv",
    "kpop/search-v0": "environments.search:SearchEnv",
    "kpop/workflow-v0": "environments.workflow:WorkflowEnv",
}


def register(env_id: str, entry_point: str | Callable[..., ChatEnv], **kwargs: Any) -> None:
    """Register a chat env with gymnasium (idempotent for the same entry point).

    Gymnasium's order-enforcing and passive-checker wrappers are off: `ChatEnv` enforces
    reset-before-step itself, and the checker's numeric checks do not apply to messages.
    """
    existing = gymnasium.registry.get(env_id)
    if existing is not None:
        if existing.entry_point == entry_point:
            return
        raise ValueError(f"env id {env_id!r} is already registered with entry point {existing.entry_point!r}")
    gymnasium.register(id=env_id, entry_point=entry_point, order_enforce=False,
                       disable_env_checker=True, kwargs=kwargs)


def _discover() -> None:
    for env_id, ep in BUILTIN.items():
        register(env_id, ep)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register(ep.name, ep.value)


def list_envs() -> list[str]:
    """Ids of all KPop environments: the built-ins and every installed plugin's."""
    _discover()
    plugin_ids = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(BUILTIN) | plugin_ids)


def is_registered(env_id: str) -> bool:
    """`env_id` may be `module:env-id`, as in `gymnasium.make`: the module is imported first
    (registering the env), so a process that never imported it can still make it."""
    _discover()
    module, _, name = env_id.rpartition(":")
    if module:
        importlib.import_module(module)
    return name in gymnasium.registry


def make(env_id: str, **kwargs: Any) -> ChatEnv:
    """Create an environment by id; `kwargs` go to its constructor (e.g. `difficulty=0`)."""
    if not is_registered(env_id):
        known = ", ".join(list_envs())
        raise KeyError(f"unknown environment {env_id!r}; known: {known}")
    env = gymnasium.make(env_id, **kwargs).unwrapped
    if not isinstance(env, ChatEnv):
        raise TypeError(f"{env_id!r} made a {type(env).__name__}, which is not an environments.core.ChatEnv")
    return env


def constructor_params(env_id: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword arguments `make(env_id, ...)` accepts: (named parameters, takes **kwargs).
    Imports the env's module (a plugin's too); raises KeyError for an unknown id."""
    if not is_registered(env_id):
        raise KeyError(f"unknown environment {env_id!r}; known: {', '.join(list_envs())}")
    entry = gymnasium.registry[env_id.rpartition(":")[2]].entry_point  # "module:id" names the env `id`
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    try:
        params = inspect.signature(entry).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no introspectable signature
        return {}, True
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())
