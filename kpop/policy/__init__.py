"""The Ring-2.6 policy (HF `BailingMoeV2_5ForCausalLM`, `model_type: bailing_hybrid`).

    config.py      BailingHybridConfig (HF fields), config_from_arch
    model.py       the model: forward (training, packed varlen) and forward_step (inference)
    cache.py       HybridCache: paged MLA latent cache + Lightning state slots (rollout contract)
    checkpoint.py  HF checkpoints (safetensors, sharded), build_model, load_policy
    tokenizer.py   the local byte-level BPE tokenizer; chat.py its chat template and output parser
    plan.py        parameter / memory arithmetic behind `kpop plan`
    presets.py     tiny (CPU tests) and small (the quickstart) architectures

Import the submodules directly; this package imports nothing heavy on purpose.
"""
