"""Tool-use family: calculator, unit conversion and SQL tools; `difficulty` 0..2."""

from environments.tooluse.env import ToolUseEnv, calculator, convert_units, open_database, split_of

__all__ = ["ToolUseEnv", "calculator", "convert_units", "open_database", "split_of"]
