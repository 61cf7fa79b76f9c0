"""Experiments built on the training package (they import it; it never imports them).

    python -m training.experiments.ablation --text ../shared/data/tinyshakespeare.txt --out runs/ablation
    python -m training.experiments.ablation --quick --text ../shared/data/tinyshakespeare.txt --out runs/ablation-quick

``ablation`` reproduces the paper's comparison (vanilla vs base / residual / anchor / mesh) at a
small scale, the depth-elasticity study and the hidden-state diagnostics; see docs/ABLATION.md.
"""
