"""Sharded data sets: WebDataset-style tar shards of prepared clips, and reading them by index.

Layout of a shard folder (``avidfast prepare ... --shards`` writes ``OUT/shards/``):

* ``shard-000000.tar``, ``shard-000001.tar``, ...: plain (uncompressed, USTAR) tar files. Each
  sample is a run of consecutive members sharing one key (the WebDataset convention, so
  ``webdataset``, ``wids`` and DALI's ``fn.readers.webdataset`` read them as they are):
  ``<key>.<video extension>`` (the clip as stored by prepare), ``<key>.<wav|flac>`` (the extracted
  audio, when prepare extracted it) and ``<key>.json`` (the sample's memory slot ``index``, its
  ``label`` and the manifest metadata: ``path``, ``duration``, ``fps``, ``width``, ``height``,
  ``sample_rate``, ``channels``, ``audio_duration``). A shard holds samples until the next one would
  take it past the shard size (a sample larger than that gets a shard of its own). Samples are
  spread over the shards in a seeded random order, so reading shard by shard is already mixed.
* ``index.npz``: the shards (name, size in bytes) and, per sample, its shard, memory slot (the
  key is the slot, zero-padded to 9 digits) and the byte offset and size of each member's data,
  so that any sample is read with one positioned read per member, without scanning the tar.

Modules: ``index`` (the index file), ``writer`` (writing shards from a manifest), ``reader`` (the
members of one sample as bytes, with the shard files kept open per process), ``order`` (which
samples each rank and loader worker reads in an epoch), ``dataset`` (the CPU pipeline's dataset
over shards).
"""
