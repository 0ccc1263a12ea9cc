"""KPop environments: chat-message Gymnasium envs with typed tools and verifiers.

    from environments import make, run_episode, oracle_agent
    env = make("kpop/tooluse-v0", difficulty=0)
    episode = asyncio.run(run_episode(env, oracle_agent(env), seed=0))   # episode.reward == 1.0

Layering: nothing here imports ray or deepspeed; sandboxes/ is the only KPop package used.
"""

from environments.core import (Agent, AssistantMessage, ChatEnv, ChatMessages, Message, MessageError, Resources,
                               Task, assistant, oracle_agent, validate_message, validate_messages)
from environments.registry import ENTRY_POINT_GROUP, list_envs, make, register
from environments.runner import Episode, run_episode
from environments.tools import Tool, Toolbox, ToolError, make_tool, tool

__all__ = ["ENTRY_POINT_GROUP", "Agent", "AssistantMessage", "ChatEnv", "ChatMessages", "Episode", "Message",
           "MessageError", "Resources", "Task", "Tool", "ToolError", "Toolbox", "assistant", "list_envs", "make",
           "make_tool", "oracle_agent", "register", "run_episode", "tool", "validate_message", "validate_messages"]
