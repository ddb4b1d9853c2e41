"""Integrations with distributed training and evaluation tools: DeepSpeed ZeRO-3 (:mod:`.deepspeed`) and
lm-evaluation-harness (:mod:`.lm_eval`, ``python -m ders_peft.integrations.lm_eval ...``). Neither tool is a
dependency of ders_peft: each module imports its tool only when used."""
