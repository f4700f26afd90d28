"""The tiny model's kit: its definition (model.py, latent.py), the procedural clips it learns from
(procedural.py), training (train.py), the prompt-adherence judge (judge.py), their commands (cli.py), the
held-out evaluation (eval.py) and the shipped weights (weights/).

model.py and latent.py sit below models/ (models/tiny.py serves them through the registry, as diffusers
serves the other families); the rest uses the product like any caller.
"""
