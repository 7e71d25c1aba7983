"""Dictionaries trained on an activation store: RQAE, Codebook Features and sae-lens SAEs.

Every architecture is driven by the one loop in `train.py` through the `Trainable`
protocol (`models/base.py`).
"""
