"""Weights from other implementations (stylegan2-ada-pytorch)."""
