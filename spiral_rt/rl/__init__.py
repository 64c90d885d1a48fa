"""spiral_rt.rl: GRPO for the video executor and the planner.

- ``advantages``: group-normalised advantages, flat and hierarchical (K plans x G executions);
- ``loss``: the clipped GRPO surrogate per transition, Gaussian KL or velocity-MSE regularisers,
  both log-prob conventions, TempAct's ratio normalisation;
- ``export``: plan-level rewards and advantages as JSONL for LLM RL trainers (TRL, verl);
- ``trainer``: ``GRPOTrainer``: recomputes a RolloutBatch's trained transitions with gradients (the
  prefix K/V rebuilt without), LoRA or full fine-tuning, checkpointing, resume, DDP.
"""

from .advantages import AdvantageConfig, HierarchicalAdvantages, group_advantages, hierarchical_advantages, zero_std_fraction
from .export import PlanRecord, plan_record_line, write_planner_jsonl
from .loss import GRPOLossConfig, GRPOLossOutput, gaussian_kl, grpo_loss, normalized_log_ratio, velocity_mse
from .trainer import (GRPOTrainer, GRPOTrainerConfig, LoRALinear, inject_lora, lora_disabled, lora_merged_state_dict,
                      merge_lora, unmerge_lora)

__all__ = [
    "AdvantageConfig", "HierarchicalAdvantages", "group_advantages", "hierarchical_advantages", "zero_std_fraction",
    "PlanRecord", "plan_record_line", "write_planner_jsonl",
    "GRPOLossConfig", "GRPOLossOutput", "gaussian_kl", "grpo_loss", "normalized_log_ratio", "velocity_mse",
    "GRPOTrainer", "GRPOTrainerConfig", "LoRALinear", "inject_lora", "lora_disabled", "lora_merged_state_dict",
    "merge_lora", "unmerge_lora",
]
