"""Resource limits of one sandbox. Shared by both backends and by the run config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Longest exec timeout or CPU limit: a day is more than any episode needs, and a finite bound
# keeps deadlines and poll timeouts representable (inf or 1e308 overflow them).
MAX_SECONDS = 86_400.0


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_time_s: float = Field(10.0, gt=0.0, le=MAX_SECONDS, allow_inf_nan=False)  # default timeout of one exec
    cpu_time_s: float = Field(10.0, gt=0.0, le=MAX_SECONDS, allow_inf_nan=False)  # per process (RLIMIT_CPU)
    memory_mb: int = Field(512, ge=16)  # whole sandbox (cgroup), incl. its tmpfs workdir
    max_pids: int = Field(64, ge=1)  # processes the sandboxed code may run at once
    file_size_mb: int = Field(64, ge=1)  # largest file one process may write (RLIMIT_FSIZE)
    network: bool = False  # True = the host's network; False = no interface but a private loopback
    disk_mb: int = Field(256, ge=1)  # size of each private tmpfs (the workdir and /tmp)
    max_output_kb: int = Field(1024, ge=1)  # stdout and stderr are each cut after this much
