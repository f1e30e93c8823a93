"""WebDataset tar shards of `Sample`s: the writer, the manifest, and plain sequential reading.

On disk (one prepared directory)::

    out/
      manifest.json              schema version, counts per dataset, shards (samples, bytes,
                                 sha256),
                                 read/written/rejected, the command and mmemb version that made it
      rejects.jsonl              one line per rejected input row (when any were rejected)
      {dataset}-000000.tar       the samples of one dataset; a shard never mixes datasets, so a
      {dataset}-000001.tar       reader can mix datasets with weights and batch one task at a time
      pool-000000.tar            (eval sets only) each distinct candidate image once, by sha1

Inside a shard each sample is a group of members sharing a key (WebDataset's convention: the key
is the name up to the first dot)::

    000000042.json               {"id", "dataset", "meta", "query", "pos", "negs": [...]}
    000000042.q.jpg              query image (original bytes; .png for PNG bytes)
    000000042.pos.png            positive image
    000000042.neg0.jpg, .neg1.jpg, ...   hard-negative images

An item in the json is ``{"text": str|null, "instruction": str|null, "image": "q.jpg"|null}``
where ``image`` names the member holding its bytes; eval sets with large shared candidate lists
store ``"image_pool": "<sha1>"`` instead and keep the bytes once in ``pool-*.tar``.

Shards are plain ustar/pax tar files with fixed metadata (mtime 0, uid 0, mode 0444), so the same
samples always give byte-identical shards and checksums; `webdataset.WebDataset` reads them too.

Modules: `codec` (a sample <-> its members), `manifest` (names, reading and checking the manifest),
`writer` (`ShardWriter`), `tar_index` (locating samples from tar headers), `readers` (sequential
reading, the image pool). Their public names are importable from here.
"""

from mmemb.data.shards.codec import decode_sample, encode_sample, split_key
from mmemb.data.shards.manifest import (
    FORMAT,
    MANIFEST_NAME,
    POOL_PREFIX,
    REJECTS_NAME,
    PathLike,
    read_manifest,
    sha256_file,
    verify_checksums,
    write_json_atomic,
)
from mmemb.data.shards.readers import ImagePool, iter_samples, iter_shard_members, resolve_shards
from mmemb.data.shards.tar_index import SampleLoc, read_members, scan_shard
from mmemb.data.shards.writer import DatasetStats, ShardWriter, safe_name

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "POOL_PREFIX",
    "REJECTS_NAME",
    "DatasetStats",
    "ImagePool",
    "PathLike",
    "SampleLoc",
    "ShardWriter",
    "decode_sample",
    "encode_sample",
    "iter_samples",
    "iter_shard_members",
    "read_manifest",
    "read_members",
    "resolve_shards",
    "safe_name",
    "scan_shard",
    "sha256_file",
    "split_key",
    "verify_checksums",
    "write_json_atomic",
]
