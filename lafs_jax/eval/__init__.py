"""Evaluation: 1:1 verification (.bin), IJB-B/C TAR@FAR, embedding export."""
