"""Representation monitors: big_vision's few-shot linear probe and DINO's kNN classifier on pre-logits features.

``probe`` (ridge regression in closed form) and ``knn`` are the math; ``features`` reads
labelled shard directories and extracts features on every rank; ``monitor`` runs both
during pretraining; ``python -m pretrain.fewshot`` runs them on any checkpoint or export.
"""
