"""One module per objective: pure functions from tensors to (loss, metrics).

sft (also sft2), ldl_grpo, dpo (single_pair_dpo, anchor_rank_dpo), grpo (anchor_grpo, judge_grpo),
ppo (self_ppo), rlsd, tvkd (tvkd_dpo); shared helpers in common.
"""
