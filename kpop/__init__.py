"""KPop: asynchronous agentic RL for the Ring-2.6 policy."""

__version__ = "0.1.0"
