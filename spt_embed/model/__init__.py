"""The encoder itself: backbone, soft prompt, one sentence-transformers module file per training method (base.py
lists them), baselines and export."""
