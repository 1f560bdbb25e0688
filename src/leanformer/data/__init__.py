"""Datasets the trainer and CLI read: the embedded default (scikit-learn's digits) first."""

from .digits import load_digits_split

__all__ = ["load_digits_split"]
