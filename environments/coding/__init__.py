"""Coding family: HumanEval and generated Python tasks, graded by hidden tests in a sandbox."""

from environments.coding.env import CodingEnv, extract_code, solution_program
from environments.coding.tasks import CodingTask, generated, humaneval

__all__ = ["CodingEnv", "CodingTask", "extract_code", "generated", "humaneval", "solution_program"]
