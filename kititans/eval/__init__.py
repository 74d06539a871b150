"""Task evaluation through lm-evaluation-harness (pip install 'kititans[eval]'): a model backend over every
KiTitans runtime (backend.py), the artifact sweep with flips and continuation KLD (sweep.py), and its
reports (report.py). A floor above runtimes, beside bench/: bench may call it, never the reverse.

Nothing here imports lm_eval at package import; `kititans.eval.backend` does (and registers "kititans").
"""
