"""The input path: shards on disk to uint8 batches on the training device.

One module per job; the training loop imports only ``train_stream``, ``eval_stream``,
``keylog`` and ``transforms.BatchPreprocessor``::

    data.train_shards ──shards──▶ urls + shard lengths (_info.json; local, or s3:// gs:// https:// through
            │                     data_tools.storage)
            ▼
      order (pure arithmetic)          (epoch, step, slot) ─▶ sample id ─▶ (shard, index in shard)
            │                                  rank r takes whole streams; worker w builds micro-batch w, w+n, ...
            │                                  window mode: a stream reads M consecutive samples at a time
            ▼
      sample_table (one per node)      offsets + lengths of every train sample, 12 bytes each, memory-mapped;
            │                          built before launch from the per-shard .tar.idx, each checked
            ▼                          against its shard and _info.json (preflight: exit 2 if stale)
      reader                           one positioned read per sample; one open per shard and worker an epoch
            │    └─ shard_cache        remote shards: whole copies on node-local disk, fetched once per node,
            │                          evicted least recently used when no process has them open
            │
            ▼
      train_stream ─ DataLoader workers: image_header (format, size: a JPEG's markers walked, else PIL),
            │                            then samples.decode_sample + transforms (cpu, cpu_full)
            │                            or decode.build_encoded_crop (gpu: encoded bytes + crop boxes)
            ▼
      (uint8 images, labels) ──▶ decode.finish_batch (gpu: nvJPEG) ──▶ transforms.BatchPreprocessor
            │                                                            (normalise on the device)
            └──▶ keylog: the keys of every step, per rank (data_keys/rank-*.jsonl)

    data.eval_shards ──shards──▶ eval_stream: sequential webdataset reads (remote: fsspec), every sample once

``samples`` holds what both streams share (per-slot seeds, corrupt-sample log, collate,
DataLoader settings). ``python -m pretrain.data.order`` answers "which samples did step s
see" without training.
"""
