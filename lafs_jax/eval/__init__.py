"""Evaluation: evaluators by name (.bin verification, IJB-B/C 1:1 and 1:N), ROC read-outs, embeddings, export."""
