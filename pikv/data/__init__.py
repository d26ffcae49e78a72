"""Data pipeline: sources -> document-level split -> tokenizer -> prepared token shards (memory
map) -> packed blocks. `python -m pikv.data.prepare` / train/prepare_data.py prepare a directory."""

from pikv.data.corpus import (Document, describe_split, fetch_shakespeare, load_documents,
                              resolve_cache_dir, split_documents, strip_boilerplate)
from pikv.data.loader import (BlockLoader, PreparedData, iter_eval_batches, num_blocks,
                              open_prepared, pack_documents, prepare_data)
from pikv.data.plan import PrepareSpec
from pikv.data.prepare import prepare
from pikv.data.prepared import PreparedDir, ShardedTokens, is_prepared
from pikv.data.sources import DataError
from pikv.data.tokenizer import EOT, eot_id, load_tokenizer, token_byte_lengths, train_bpe

__all__ = [
    "Document", "describe_split", "fetch_shakespeare", "load_documents", "resolve_cache_dir",
    "split_documents", "strip_boilerplate", "BlockLoader", "PreparedData", "iter_eval_batches",
    "num_blocks", "open_prepared", "pack_documents", "prepare_data", "PrepareSpec", "prepare",
    "PreparedDir", "ShardedTokens", "is_prepared", "DataError", "EOT", "eot_id", "load_tokenizer",
    "token_byte_lengths", "train_bpe",
]
