"""Optimizers beyond torch's: Muon with the Moonlight recipe."""
from moetrain.optim.groups import is_muon_param, muon_param_groups
from moetrain.optim.muon import MoonlightMuon, muon_scale, newton_schulz

__all__ = ["MoonlightMuon", "is_muon_param", "muon_param_groups", "muon_scale", "newton_schulz"]
