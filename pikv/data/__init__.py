"""Data pipeline: documents -> document-level split -> byte-level BPE -> packed blocks."""

from pikv.data.corpus import (Document, describe_split, fetch_shakespeare, load_documents,
                              resolve_cache_dir, split_documents, strip_boilerplate)
from pikv.data.loader import (BlockLoader, PreparedData, data_cache_key, iter_eval_batches,
                              num_blocks, pack_documents, prepare_data)
from pikv.data.tokenizer import EOT, eot_id, load_tokenizer, token_byte_lengths, train_bpe

__all__ = [
    "Document", "describe_split", "fetch_shakespeare", "load_documents", "resolve_cache_dir",
    "split_documents", "strip_boilerplate", "BlockLoader", "PreparedData", "data_cache_key",
    "iter_eval_batches", "num_blocks", "pack_documents", "prepare_data", "EOT", "eot_id",
    "load_tokenizer", "token_byte_lengths", "train_bpe",
]
