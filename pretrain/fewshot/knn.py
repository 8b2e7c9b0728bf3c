"""DINO's weighted k-nearest-neighbour classifier (``eval_knn.py``'s ``knn_classifier``).

Features are L2-normalised; each query's ``k`` most cosine-similar bank images vote for
their class with weight ``exp(similarity / temperature)``; the class with the largest
sum wins. Queries go in chunks so the (chunk, bank) similarity matrix stays bounded
(``CHUNK`` x a 100,000-image bank is 400 MB in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 1024


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Predicted class per row of ``queries`` (N, D) from ``bank`` (M, D) with labels (M,)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in queries.float().split(CHUNK):
        similarity, index = (F.normalize(chunk, dim=1) @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=torch.float32, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)
