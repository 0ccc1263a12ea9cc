"""Workflow family: resolve support tickets over a seeded shop database; graded on final state."""

from environments.workflow.env import Shop, WorkflowEnv, build_database

__all__ = ["Shop", "WorkflowEnv", "build_database"]
