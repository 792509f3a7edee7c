"""The encoder itself: backbone, soft prompt, the sentence-transformers module, baselines and export."""
