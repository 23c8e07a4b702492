"""Peer baselines run on the study's cached features: Tip-Adapter(-F), UPL, CoOp and a linear probe."""

from upa.baselines.runner import METHODS, SUPERVISED, UNSUPERVISED, BaselineInputs, BaselineSettings, evaluate_baselines

__all__ = ["METHODS", "SUPERVISED", "UNSUPERVISED", "BaselineInputs", "BaselineSettings", "evaluate_baselines"]
