"""vitscale data_tools: image datasets -> webdataset shards (``python -m data_tools convert|verify|info|demo``).

Modules: ``sources`` (list ImageFolder / class tars / CSV into columns), ``images``
(check and re-encode policy), ``plan`` (seeded hash order, shard assignment, keys),
``planfile`` (the plan on disk, written once under a lock, read by slices), ``lockfile``
(a lock file that works across nodes, taken over once its holder is dead), ``reads``
(sequential reads of class tars, in waves), ``pipeline`` (tasks over workers, results
in order per shard), ``writer`` (one shard, durable), ``convert`` (the whole
conversion, resumable, in parts), ``manifest`` (``_info.json`` / ``classes.json``
reader and locked writer, standard library only), ``verify`` (parallel), ``info``, ``demo``.
"""
