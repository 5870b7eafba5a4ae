"""Unlearning with ℓ1 on LoRA (CLEAR): so far the TOFU-style metrics; the losses are in llmreg/losses/unlearning.py."""
