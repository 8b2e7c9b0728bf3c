"""Representation monitors: big_vision's few-shot linear probe and DINO's kNN classifier on pre-logits features.

Why in the loop: a pretraining run's upstream loss and top-1 say little about its features
downstream, and finetuning to find out costs another run; a closed-form probe on a few
labelled images per class of other datasets answers in seconds (big_vision's headline is
ImageNet 10-shot, every 10k steps of its ImageNet-21k runs).

``probe`` (ridge regression in closed form) and ``knn`` are the math; ``features`` reads
labelled shard directories and extracts features on every rank (which layer, and why, is
its docstring); ``monitor`` runs both for the training loop (``eval.fewshot``, ``eval.knn``);
``source`` loads any checkpoint, export or timm weights for ``python -m pretrain.fewshot``.
"""
