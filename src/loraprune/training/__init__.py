"""Training: the recipe that fine-tunes LoRA while masks shrink, and what it is made of.

lora.py wraps a model with adapters; losses.py holds the training losses; recipe.py is the loop
(set-up, forward/backward, score, commit); checkpoint.py saves and restores a run bit for bit;
oneshot.py scores once on calibration data and jumps straight to the target.
"""
