"""Evaluation tasks: the MMEB protocol (P@1 over each query's candidates) and global retrieval."""
