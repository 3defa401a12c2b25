"""Benchmarks of Latent Diffusion Studio: ratios side by side with their goals (docs/ARCHITECTURE.md, Measuring).

`python -m benchmarks` runs them all and prints one table; see benchmarks/__main__.py and README "Performance".
"""
