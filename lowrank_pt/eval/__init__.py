"""Evaluation: validation loss, answer-token accuracy and exact match (``scores``), and sampling
from a trained model (``generate``, also the ``lowrank-pt generate`` command)."""
