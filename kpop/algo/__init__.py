"""RL algorithms as pure torch functions: advantages.py (GRPO, RLOO, dynamic filter, Evo-CoT length
reward) and losses.py (PPO-clip, GSPO, LPO; off-policy, IcePop and KPop corrections)."""
