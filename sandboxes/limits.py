"""Resource limits of one sandbox. Shared by both backends and by the run config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_time_s: float = Field(10.0, gt=0.0)  # default timeout of one exec
    cpu_time_s: float = Field(10.0, gt=0.0)
    memory_mb: int = Field(512, ge=16)
    max_pids: int = Field(64, ge=1)
    file_size_mb: int = Field(64, ge=1)
    network: bool = False
