"""`mmemb prepare` sources: MMEB train/eval, generic jsonl, image folders, the synthetic generator."""
