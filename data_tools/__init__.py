"""vitscale data_tools: image datasets -> webdataset shards (``python -m data_tools convert|verify|info|demo``).

Modules: ``sources`` (list ImageFolder / class tars / CSV), ``images`` (check and
re-encode policy), ``plan`` (seeded shuffle, shard assignment, keys), ``writer``
(one shard, crash-safe), ``convert`` (the whole conversion, resumable),
``manifest`` (``_info.json`` / ``classes.json`` reader, standard library only),
``verify``, ``info``, ``demo``.
"""
