"""Robust source objectives: what a source model is trained with before it is adapted (`train-source
--objective`): self-adaptive training for noisy labels (sat), Core-tuning for a pretrained encoder
(core_tuning), PGD adversarial training and CIFS (adversarial, objectives), and the label noise of the
experiments (label_noise)."""
