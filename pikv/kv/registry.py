"""The registry of KV methods: names -> (storage, selection), the byte-budget split, `make_cache`.

A method name is `STORAGE[@SHARE][:FORMAT]+SELECTION` (`quant+snapkv`, `learned@2+h2o`, `svd+window`,
`rquant:k4v4g64+h2o`: rquant's key bits, value bits, channels per scale group; `learned:b4+h2o`,
`learned@4:b4+h2o`: the learned latent's codes stored at 4 bits (`nf4g16`: NF4 levels, 16 coordinates
per scale), whatever width it was trained at, its rank from the budget capped by the compressor's
max_rank); a
single name is that part with the other at its neutral value (`h2o` = exact+h2o, `quant` =
quant+all, `full` = exact+all). Canonical names drop the neutral parts, so every single method keeps
its name. The budget rule (docs/kv.md, "One byte budget"): `ratio` is against an fp16 full cache of
the same tokens. A single storage takes all of it; a single selection keeps ceil(total / ratio)
tokens per layer; a composition gives the storage its share (SHARE, else the default: 4-bit codes
for quant, budgets.rquant_format's rule for rquant, the geometric split sqrt(ratio) for svd /
learned, the latent's moved to the nearest share it can take) and the selection keeps
ceil(total / (ratio / storage ratio)) tokens (a named learned format
capped at the compressor's max_rank takes less than its share: the selection then keeps the tokens
whose bytes, as codes at max_rank beside the exact window, fill the budget). The measured ratio
(peak bytes, metadata and capacity included) is what the evaluation reports.

To add a method: a `Selection` subclass in selection.py (a score and a protect rule) and its
name in SELECTIONS, or a `Store` subclass (append / read / settle / keep) and a branch in
`_store_factory`; every existing storage / selection then composes with it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist

from pikv.kv.budgets import (KVOptions, parse_quant_format, pyramid_budgets, quant_plan, quant_token_ratio,
                             rquant_format, snap_window_for, token_budget)
from pikv.kv.cache import KVCache
from pikv.kv.latent_codes import parse_latent_format
from pikv.kv.learned import latent_rank
from pikv.kv.mla import MLAStore
from pikv.kv.quant import KiviStore, TokenQuantStore
from pikv.kv.rotated import RotatedQuantStore, rotation_matrix
from pikv.kv.selection import SELECTIONS
from pikv.kv.sharded import ShardedKVCache, check_shardable, shard_block, shard_capacity
from pikv.kv.sharded_latent import ShardedLatentStore, ShardedMLAStore
from pikv.kv.storage import LatentStore, Store, SVDStore

STORAGES = ("exact", "quant", "rquant", "svd", "learned")
SELECTION_NAMES = tuple(SELECTIONS)  # all, window, streaming, h2o, snapkv, pyramid, lru, quest
# Every single name a user may give: the full cache, each selection (exact storage), each storage (all kept).
POLICIES = ("full",) + SELECTION_NAMES[1:] + STORAGES[1:]
# Names users of the original PiKV know (Pyramid / SVD / Quantization compressors, LRU / H2O / QUEST
# caches) and common spellings.
ALIASES = {"quantized": "quant", "quantization": "quant", "kivi": "quant", "fp16": "exact",
           "rotated": "rquant", "quarot": "rquant",
           "sliding": "window", "streamingllm": "streaming", "sink": "streaming", "pyramidkv": "pyramid"}
# Names that meant something else here: 'lora' was the learned latent, while LoRA in PiKV means the
# LoRA experts of moe.kind=pikv (one word, one meaning).
RETIRED = {"lora": "'learned' (the jointly trained KV latent; LoRA experts are moe.kind=pikv)"}


@dataclasses.dataclass(frozen=True)
class Method:
    storage: str = "exact"
    selection: str = "all"
    share: Optional[float] = None  # the storage's ratio in a composition (None: the default split)
    fmt: Optional[str] = None  # rquant's named format (`k4v2g64`; None: the split rule's) / learned's (`b4g32`)

    @property
    def name(self) -> str:
        """Canonical name: neutral parts dropped (`h2o`, `quant`, `quant@4+h2o`, `rquant:k4v2g64+h2o`, `full`)."""
        store = self.storage + (f"@{self.share:g}" if self.share is not None else "")
        store += f":{self.fmt}" if self.fmt else ""
        if self.selection == "all":
            return "full" if self.storage == "exact" else store
        return self.selection if self.storage == "exact" else f"{store}+{self.selection}"


def _one(part: str, name: str) -> str:
    key = part.strip().lower()
    if key in RETIRED:
        raise ValueError(f"kv policy {part!r} is retired: use {RETIRED[key]}")
    key = ALIASES.get(key, key)
    if key == "full":
        return "exact"
    if key not in STORAGES and key not in SELECTIONS:
        raise ValueError(f"unknown kv policy {part!r}" + (f" in {name!r}" if part != name else "")
                         + f": allowed are {', '.join(POLICIES)}, or STORAGE[@SHARE]+SELECTION with storage in "
                         f"{', '.join(STORAGES)} and selection in {', '.join(SELECTION_NAMES)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return key


def _format(first: str, name: str) -> tuple[str, Optional[str]]:
    """'rquant:k4v2' -> ('rquant', 'k4v2g64'): a named rquant format, group filled in; 'learned@4:b4' ->
    ('learned@4', 'b4g32'): the learned latent's code format (its share stays: the format sizes its rank)."""
    if ":" not in first:
        return first, None
    first, raw = first.split(":", 1)
    storage = first.split("@", 1)[0].strip().lower()
    storage = ALIASES.get(storage, storage)
    if storage not in ("rquant", "learned"):
        raise ValueError(f"kv method {name!r}: a format (:{raw}) is given to rquant storage (rquant:k4v2g64) or "
                         f"learned storage (learned:b4, b4g16, nf4g16, b8, b16) only")
    if storage == "rquant" and "@" in first:
        raise ValueError(f"kv method {name!r}: give rquant a format or a share, not both (the format fixes its ratio)")
    try:
        if storage == "learned":
            return first, parse_latent_format(raw).name
        return first, parse_quant_format(raw, KVOptions.rquant_group).name
    except ValueError as err:
        raise ValueError(f"kv method {name!r}: {err}") from None


def parse_method(name: str) -> Method:
    """'quant@4+h2o' -> Method('quant', 'h2o', 4.0); 'rquant:k4v2+h2o' -> Method('rquant', 'h2o',
    fmt='k4v2g64'); 'learned:b4' -> Method('learned', fmt='b4g32'); ValueError naming the bad part and
    what is allowed."""
    parts = str(name).split("+")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(f"kv method {name!r} must be one name or STORAGE[@SHARE][:FORMAT]+SELECTION")
    share = None
    first, fmt = _format(parts[0], name)
    if "@" in first:
        first, raw = first.split("@", 1)
        try:
            share = float(raw)
        except ValueError:
            raise ValueError(f"kv method {name!r}: storage share {raw!r} must be a number >= 1") from None
        if not share >= 1:
            raise ValueError(f"kv method {name!r}: storage share {share:g} must be >= 1")
    a = _one(first, name)
    if len(parts) == 1:
        if share is not None:
            raise ValueError(f"kv method {name!r}: a storage share needs a selection (STORAGE@SHARE+SELECTION)")
        return Method(a, "all", fmt=fmt) if a in STORAGES else Method("exact", a)
    b = _one(parts[1], name)
    if a not in STORAGES or b not in SELECTIONS:
        raise ValueError(f"kv method {name!r} must be STORAGE+SELECTION: storage one of {', '.join(STORAGES)}, "
                         f"selection one of {', '.join(SELECTION_NAMES)}")
    if share is not None and a == "exact":
        raise ValueError(f"kv method {name!r}: exact storage takes no share (it is 1x)")
    return Method(a, b, share, fmt)


def resolve_policy(name: str) -> str:
    """Canonical method name; ValueError naming the value and the allowed names."""
    return parse_method(name).name


def _dims(model) -> tuple[int, int, int]:
    cfg = model.cfg
    return cfg.num_layers, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads


def _compressor(model, method: Method):
    comp = model.layers[0].self_attn.kv_compressor
    if comp is None:
        raise ValueError(f"kv method {method.name!r}: storage 'learned' needs a model trained with "
                         f"kv.compressor=learned (this model has no KV compressor); allowed storages here: "
                         "exact, quant, rquant, svd")
    return comp


def _storage_ratio(method: Method, ratio: float, model, D: int, opt: KVOptions,
                   total_tokens: Optional[int] = None) -> tuple[float, dict]:
    """(the storage's nominal ratio, its parameters) in a composition at `ratio`."""
    s = method.share
    if s is None and method.storage == "learned":
        s = _learned_share(method, ratio, model, total_tokens)
    if method.storage == "quant":
        ratios = {b: quant_token_ratio(D, b, opt.quant_group) for b in (2, 4)}
        if s is None:
            bits = 4  # KIVI's main setting; the selection takes the rest
        else:
            bits = next((b for b in (2, 4) if s >= ratios[b] - 1e-9), None)
            if bits is None:
                raise ValueError(f"kv method {method.name!r}: quant share {s:g} is below its mildest format "
                                 f"(4-bit, {ratios[4]:.2f}x); allowed shares >= {ratios[4]:.2f}")
        return ratios[bits], {"bits": bits}
    if method.storage == "rquant":
        fmt = _rquant_format(method, ratio, D, opt, alone=False)
        return fmt.ratio(D), {"format": fmt}
    s = math.sqrt(ratio) if s is None else s
    if method.storage == "svd":
        rank = int(D // s)
        if rank < 1:
            raise ValueError(f"kv method {method.name!r}: svd share {s:g} leaves no rank >= 1 (head dim {D})")
        return D / rank, {"rank": rank}
    return s, {"share": s}  # learned: the rank is sized once the selection's budget is known


def _learned_share(method: Method, ratio: float, model, total_tokens: Optional[int]) -> float:
    """The latent's default share at `ratio`: sqrt(ratio), raised when that needs a rank above the
    trained max_rank (2x on the default model: 1.41x would; max_rank gives about 2x) to the smallest
    share, on a grid of 257 from 1 to ratio, that fits: a rank <= max_rank for the tokens the
    selection then keeps, more of them than the exact window. Never lowered: below a share that
    does not fit for lack of bytes, the largest one that fits always leaves rank 1 (16x on the
    default model); sqrt(ratio) is kept and its error says what is possible."""
    comp, target = _compressor(model, method), math.sqrt(ratio)

    def fits(share: float) -> bool:
        M = token_budget(ratio / share, None, total_tokens)
        if M <= comp.window:
            return False
        try:
            _latent_params(method, model, share, M if comp.window else None)
        except ValueError:
            return False
        return True
    if fits(target):
        return target
    return next((s for s in (ratio ** (i / 256) for i in range(257)) if s > target and fits(s)), target)


def _rquant_format(method: Method, ratio, D: int, opt: KVOptions, alone: bool):
    """rquant's format: the named one, else the rule of budgets.rquant_format; ValueError naming the method."""
    try:
        if method.fmt:
            return parse_quant_format(method.fmt, opt.rquant_group).check(D)
        return rquant_format(ratio, D, opt.rquant_group, method.share, alone)
    except ValueError as err:
        raise ValueError(f"kv method {method.name!r}" + (f" at ratio {ratio:g}" if ratio else "") + f": {err}") from None


def _split(method: Method, ratio: float, model, D: int, opt: KVOptions, total_tokens: Optional[int]) -> tuple[float, dict]:
    """(the selection's ratio, the storage's parameters) of a composition; ValueError naming both
    parts when the storage alone exceeds the ratio."""
    s, params = _storage_ratio(method, ratio, model, D, opt, total_tokens)
    if ratio < s - 1e-9:
        raise ValueError(f"kv ratio {ratio:g} is impossible for {method.name!r}: storage {method.storage!r} alone "
                         f"takes {s:.2f}x, leaving {ratio / s:.2f}x (< 1) for selection {method.selection!r}; "
                         f"allowed: ratio >= {s:.2f}, or an explicit split {method.storage}@SHARE+{method.selection} "
                         f"with SHARE <= ratio")
    return ratio / s, params


def _alone(method: Method, model, ratio, tokens, total_tokens, opt: KVOptions, svd_bases) -> dict:
    """A storage that holds every token takes the whole ratio: its parameters."""
    L, G, D = _dims(model)
    if tokens is not None or ratio is None:
        raise ValueError(f"kv policy {method.storage!r} takes a compression ratio, not a token budget (tokens={tokens})")
    if not ratio >= 1:
        raise ValueError(f"kv compression ratio {ratio} is impossible: must be >= 1")
    if method.storage == "quant":
        bits, residual = quant_plan(ratio, D, total_tokens, opt.quant_group, opt.quant_residual)
        return {"bits": bits, "residual": residual}
    if method.storage == "rquant":
        return {"format": _rquant_format(method, ratio, D, opt, alone=True)}
    if method.storage == "svd":
        rank = int(D // ratio)
        if rank < 1:
            raise ValueError(f"kv compression ratio {ratio} is impossible for svd: rank D/ratio < 1 (D={D})")
        return {"rank": rank}
    return _latent_params(method, model, ratio, total_tokens)


def _latent_params(method: Method, model, ratio: float, length: Optional[int]) -> dict:
    """The learned latent's rank and code format at `ratio` over `length` tokens: the largest rank
    that fits, in the trained format (a rank above the trained max_rank is an error) or in a named
    one (`learned:b4`: capped at max_rank, so the measured ratio can exceed the requested one)."""
    _, G, D = _dims(model)
    comp = _compressor(model, method)
    fmt = parse_latent_format(method.fmt) if method.fmt else comp.codes
    rank = latent_rank(G, D, ratio, fmt.bits, comp.window, length, comp.rot, fmt.group)
    return {"rank": min(rank, comp.max_rank) if method.fmt else comp.check_rank(rank), "format": fmt}


def _capped_budget(model, params: dict, ratio: float, total_tokens: int) -> int:
    """Tokens a selection keeps beside a learned latent capped at max_rank (a named format): as many
    as the budget total_tokens * fp16 bytes / ratio holds, the window's exact and the rest as codes."""
    _, G, D = _dims(model)
    comp, fmt = _compressor(model, Method("learned")), params["format"]
    full, W = 4 * G * D, comp.window
    per_token = fmt.token_bytes(params["rank"]) + fmt.rotary_bytes(G, comp.rot)
    return min(total_tokens, max(W + 1, math.floor(W + (total_tokens * full / ratio - W * full) / per_token)))


def _composed(method: Method, model, ratio, tokens, total_tokens, opt: KVOptions) -> tuple[int, dict]:
    """(the selection's token budget per layer, the storage's parameters) of any other method."""
    L, G, D = _dims(model)
    if method.storage == "exact":
        return token_budget(ratio, tokens, total_tokens), {}
    if ratio is not None and not ratio >= 1:
        raise ValueError(f"kv compression ratio {ratio} is impossible: must be >= 1")
    if tokens is not None:  # the selection's budget given; the storage takes its share
        if method.share is None and method.storage not in ("quant", "rquant"):
            raise ValueError(f"kv method {method.name!r} with a token budget needs an explicit storage share "
                             f"({method.storage}@SHARE+{method.selection})")
        params = _storage_ratio(method, method.share or 1.0, model, D, opt)[1]
        M = token_budget(None, tokens, None)
    else:
        sel_ratio, params = _split(method, ratio, model, D, opt, total_tokens)
        M = token_budget(sel_ratio, None, total_tokens)
    if method.storage == "quant" and not SELECTIONS[method.selection].evicts:
        params["residual"] = opt.quant_residual or 0
    if method.storage == "learned":
        comp = _compressor(model, method)
        if M <= comp.window:
            raise ValueError(f"kv method {method.name!r}: selection {method.selection!r} keeps {M} tokens per layer, "
                             f"not more than the learned latent's exact window of {comp.window}; allowed: a "
                             f"budget above {comp.window} tokens (a smaller ratio or storage share)")
        share = params.pop("share")
        try:
            params = _latent_params(method, model, share, M if comp.window else None)
        except ValueError as err:
            raise ValueError(f"kv method {method.name!r} at ratio {ratio}: storage 'learned' at share {share:.2f}x "
                             f"beside selection {method.selection!r} keeping {M} tokens: {err}; allowed: another "
                             f"split, learned@SHARE+{method.selection}") from None
        if method.fmt and tokens is None and params["rank"] == comp.max_rank:  # a named format capped at
            M = _capped_budget(model, params, ratio, total_tokens)  # max_rank: the selection gets what it leaves
    return M, params


def _store_factory(method: Method, model, params: dict, capacity: list[int], store_dtype, opt: KVOptions,
                   svd_bases, evicts: bool, shard_group=None):
    # rquant: one rotation per cache, shared by every layer's store (not counted in nbytes: pikv/kv/rotated.py)
    rotation = rotation_matrix(_dims(model)[2], opt.rotation_seed) if method.storage == "rquant" else None

    def build(li: int) -> Store:
        cap = capacity[li]
        if method.storage == "quant":
            if evicts:
                return TokenQuantStore(params["bits"], opt.quant_group, None, 256, cap)
            return KiviStore(params["bits"], opt.quant_group, params["residual"], store_dtype)
        if method.storage == "rquant":
            f = params["format"]
            return RotatedQuantStore(rotation, f.key_bits, f.group, None, 256, cap, f.value_bits)
        if method.storage == "svd":
            return SVDStore(svd_bases[li], params["rank"], store_dtype, 256, cap)
        if method.storage == "learned":
            comp = model.layers[li].self_attn.kv_compressor  # decoupled (partial rotary): absorbed attention
            if shard_group is not None:
                return (ShardedMLAStore if comp.rot else ShardedLatentStore)(
                    comp, params["rank"], store_dtype, 256, cap, shard_rank=dist.get_rank(shard_group),
                    world=dist.get_world_size(shard_group), fmt=params["format"])
            return (MLAStore if comp.rot else LatentStore)(comp, params["rank"], store_dtype, 256, cap,
                                                           fmt=params["format"])
        return Store(store_dtype, 256, cap)
    return build


def make_cache(policy: str, model, *, ratio: Optional[float] = None, tokens: Optional[int] = None,
               total_tokens: Optional[int] = None, store_dtype: Optional[torch.dtype] = torch.float16,
               options: Optional[KVOptions] = None, svd_bases=None, shard_group=None) -> KVCache:
    """A KVCache of method `policy` (STORAGE[@SHARE]+SELECTION or a single name) for `model` (a pikv
    Transformer) at a budget: `ratio` (fp16 full bytes / kept bytes, split by the module's rule) or
    `tokens` (the selection's tokens per layer). total_tokens: the sequence length the cache will
    hold (ratios of token budgets, KIVI's plan, the buffers' preallocation). ValueError for an
    unknown name or an impossible budget, naming both parts. shard_group: a process group of world
    size > 1 shards every layer's tokens over its ranks (pikv/kv/sharded.py; every rank calls the
    model with the same tokens); nbytes() is then this rank's bytes."""
    method = parse_method(policy)
    L, G, D = _dims(model)
    opt = options or KVOptions()
    selection_cls = SELECTIONS[method.selection]
    if method.storage == "svd" and svd_bases is None:
        raise ValueError(f"kv method {method.name!r}: storage 'svd' needs calibration bases: "
                         "svd_bases=calibrate_svd(model, tokens)")
    budgets = None
    if method.selection == "all":
        params = {} if method.storage == "exact" else _alone(method, model, ratio, tokens, total_tokens, opt, svd_bases)
    else:
        M, params = _composed(method, model, ratio, tokens, total_tokens, opt)
        lo = selection_cls(opt).min_budget()
        if M < lo:
            raise ValueError(f"kv budget of {M} tokens per layer is impossible for {method.name!r}: "
                             f"selection {method.selection!r} needs >= {lo}")
        budgets = [M] * L
        if method.selection in ("snapkv", "pyramid"):  # the observation window, resolved from the mean budget
            opt = dataclasses.replace(opt, snap_window=snap_window_for(opt.snap_window, M))
            if method.selection == "pyramid":  # length: the tokens a layer sees (kvpress: the prompt)
                budgets = pyramid_budgets(M, L, opt.pyramid_beta, opt.snap_window, total_tokens, lo)
    evicts = selection_cls.evicts
    capacity = [b + 1 for b in budgets] if evicts else [total_tokens or 0] * L
    cls, shard = KVCache, {}
    if shard_group is not None and dist.get_world_size(shard_group) > 1:  # the sharded cache
        check_shardable(method.name, method.storage, method.selection, opt.prefill_only)
        block = shard_block(method.storage, method.selection, opt.quant_group, opt.quest_page)
        capacity = shard_capacity(capacity, evicts, dist.get_world_size(shard_group), block)
        cls, shard = ShardedKVCache, {"group": shard_group, "block": block}
    build = _store_factory(method, model, params, capacity, store_dtype, opt, svd_bases, evicts, shard.get("group"))
    cache = cls(L, name=method.name, store=build, selection=selection_cls(opt), budgets=budgets,
                options=opt, capacity=capacity, store_dtype=store_dtype, **shard)
    cache.info = params
    return cache
