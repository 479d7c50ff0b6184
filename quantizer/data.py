"""Calibration and evaluation text: dataset specs, offline corpora, tokenized sample batches.

Dataset spec syntax (as the reference tool): ``name[:split=a+b][:num=N][:concat=True]``, several
comma-separated; a bare split name (``mbpp:train+validation+test``) is short for ``split=...``.  ``name`` is a local ``.txt``/``.json``/``.jsonl`` file or a Hugging Face dataset id; a
list of strings, a list of token-id tensors/lists/dicts or a torch ``DataLoader`` also work.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import AutoRoundError, DatasetError
from ..log import logger

DEFAULT_DATASET = "NeelNanda/pile-10k"
PACKAGED_CORPUS = "pydoc"  # Python's own documentation prose, always installed
_SPEC_KEYS = ("split", "num", "concat", "apply_chat_template", "system_prompt", "text_key")
_SPLIT_NAME = re.compile(r"(train|validation|valid|test|dev)(\[[^\]]*\])?(\+(train|validation|valid|test|dev)(\[[^\]]*\])?)*")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    split: str | None = None
    num: int | None = None
    concat: bool = False
    text_key: str = "text"
    apply_chat_template: bool = False
    system_prompt: str | None = None


def whole_batches(n_samples: int, batch_size: int) -> tuple[int, int]:
    """(batch size, usable samples): ``batch_size`` capped at the sample count, and the largest multiple of it not
    above ``n_samples``: the samples the block loops run (a block's keyword arguments are one whole batch's)."""
    bs = min(batch_size, n_samples)
    return bs, (n_samples // bs) * bs


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, cur, quote = [], [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise DatasetError(f"unbalanced quote in dataset spec {text!r}")
    parts.append("".join(cur))
    return parts


def _unquote(val: str) -> str:
    val = val.strip()
    if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
        return val[1:-1]
    return val


def _bool(val: str, key: str, part: str) -> bool:
    if val.strip().lower() not in ("", "true", "false"):
        raise DatasetError(f"{key} must be True or False in {part!r}")
    return val.strip().lower() in ("", "true")


def parse_dataset_spec(spec: str) -> list[DatasetSpec]:
    """``name[:split=a+b][:num=N][:concat=True][:apply_chat_template][:system_prompt="..."]``, comma-separated.

    Values may be quoted (``system_prompt="You are: helpful, brief."``) to hold ``:`` or ``,``."""
    out = []
    for part in [p.strip() for p in _split_outside_quotes(spec, ",") if p.strip()]:
        name, *opts = _split_outside_quotes(part, ":")
        kw: dict[str, Any] = {}
        for opt in opts:
            key, eq, val = opt.partition("=")
            key = key.strip()
            if not eq and key not in _SPEC_KEYS and _SPLIT_NAME.fullmatch(key):
                key, val = "split", key  # the reference's bare split: 'name:train', 'name:train+validation'
            if key not in _SPEC_KEYS:
                raise DatasetError(f"unknown dataset option {key!r} in {part!r}; valid options: {', '.join(_SPEC_KEYS)}")
            if key == "num":
                if not val.strip().isdigit() or int(val) <= 0:
                    raise DatasetError(f"num must be a positive integer in {part!r}")
                kw["num"] = int(val)
            elif key in ("concat", "apply_chat_template"):
                kw[key] = _bool(val, key, part)
            elif key in ("split", "text_key", "system_prompt"):
                if not _unquote(val):
                    raise DatasetError(f"{key} needs a value in {part!r}, e.g. {key}=train")
                kw[key] = _unquote(val)
        if not name.strip():
            raise DatasetError(f"empty dataset name in {spec!r}")
        if kw.get("system_prompt") is not None and not kw.get("apply_chat_template"):
            kw["apply_chat_template"] = True  # a system prompt only exists inside a chat template
        out.append(DatasetSpec(name=name.strip(), **kw))
    if not out:
        raise DatasetError(f"empty dataset spec {spec!r}; e.g. 'NeelNanda/pile-10k' or './calib.txt'")
    return out


def packaged_texts() -> list[str]:
    """Offline calibration corpus shipped with Python: the documentation topics of ``pydoc_data``."""
    from pydoc_data.topics import topics

    return [t for _, t in sorted(topics.items()) if len(t) > 200]


def wikipedia_text() -> str:
    """The real English Wikipedia articles that ``gensim`` ships as test data (markup stripped), as one text."""
    return "\n\n".join(wikipedia_articles())


def news_articles() -> list[str]:
    """The 300 news articles of the Lee corpus that ``gensim`` ships as test data (``lee_background.cor``)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise DatasetError("the news evaluation text comes from gensim's test data: pip install gensim") from None
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def wikipedia_articles() -> list[str]:
    """The real English Wikipedia articles that ``gensim`` ships as test data (markup stripped), title first."""
    try:
        import gensim  # noqa: F401
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise DatasetError("the Wikipedia evaluation text comes from gensim's test data: pip install gensim") from None
    import bz2

    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    parts = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for title, text, _ in extract_pages(f):
            body = filter_wiki(text).strip()
            if len(body) > 500:
                parts.append(f"{title}\n\n{body}")
    return parts


def _read_local(path: Path, text_key: str) -> list[str]:
    if path.suffix == ".txt":
        return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if path.suffix in (".json", ".jsonl"):
        raw = path.read_text(encoding="utf-8")
        rows = (
            [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        )
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get("train", [rows]))
        texts = []
        for row in rows:
            if isinstance(row, str):
                texts.append(row)
            elif isinstance(row, dict) and text_key in row:
                texts.append(str(row[text_key]))
            else:
                raise DatasetError(f"{path}: each record must be a string or have a {text_key!r} field")
        return texts
    if path.suffix == ".parquet":
        import datasets

        return [str(t) for t in datasets.load_dataset("parquet", data_files=str(path), split="train")[text_key]]
    raise DatasetError(f"unsupported local dataset file {path}; use .txt, .json, .jsonl or .parquet")


def _read_hub(spec: DatasetSpec) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.name, split=spec.split or "train")
    except Exception as exc:
        raise DatasetError(
            f"could not load dataset {spec.name!r} from the Hugging Face hub ({type(exc).__name__}); "
            "if this machine is offline, pass a local file instead, e.g. dataset='./calib.txt' "
            "(.txt/.json/.jsonl/.parquet) or a list of strings"
        ) from None
    if spec.text_key not in ds.column_names:
        raise DatasetError(f"dataset {spec.name!r} has no {spec.text_key!r} column; columns: {ds.column_names}")
    return [str(t) for t in ds[spec.text_key]]


def texts_for(spec: DatasetSpec) -> tuple[list[str], bool]:
    """(texts, whether they are the packaged corpus, which is always concatenated)."""
    path = Path(spec.name).expanduser()
    if spec.name == PACKAGED_CORPUS:
        return packaged_texts(), True
    if path.exists():
        return _read_local(path, spec.text_key), False
    if spec.name.startswith((".", "/", "~")) or path.suffix in (".txt", ".json", ".jsonl", ".parquet"):
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        return _read_hub(spec), False
    except DatasetError:
        if spec.name != DEFAULT_DATASET:
            raise
        logger.warning(
            "the default calibration dataset %s is not reachable (offline?); using the packaged offline corpus "
            "(Python's documentation prose) instead. Pass dataset=... to choose your own data.",
            DEFAULT_DATASET,
        )
        return packaged_texts(), True


def _tokenize(texts: Iterable[str], tokenizer: Any, chat: bool = False, system_prompt: str | None = None) -> list[list[int]]:
    if tokenizer is None:
        raise DatasetError("text calibration data needs a tokenizer: pass tokenizer=... or token-id samples")
    if not chat:
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "apply_chat_template: this tokenizer has no chat template; drop the option or use an instruct model's "
            "tokenizer"
        )
    out = []
    for t in texts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": t}
        ]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def _spec_samples(spec: DatasetSpec, tokenizer: Any, seqlen: int) -> list[list[int]]:
    """Read, tokenize and cut one dataset of a spec string into ``seqlen``-token samples."""
    texts, packaged = texts_for(spec)
    concat = spec.concat or packaged
    eos = getattr(tokenizer, "eos_token_id", None)
    got = _samples_from_ids(_tokenize(texts, tokenizer, spec.apply_chat_template, spec.system_prompt), seqlen, concat, eos)
    if not got:
        logger.warning("dataset %s: no sample has %d tokens%s", spec.name, seqlen,
                       "" if concat else " (add ':concat=True' to join short texts)")
    return got[: spec.num] if spec.num is not None else got


def _specs_samples(specs: list[DatasetSpec], tokenizer: Any, seqlen: int) -> list[list[int]]:
    return [s for spec in specs for s in _spec_samples(spec, tokenizer, seqlen)]


def _tokenize_specs(specs: list[DatasetSpec], tokenizer: Any, seqlen: int) -> list[list[int]]:
    """Dataset loading and tokenization run in a child process by default, so the datasets library's memory and
    any tokenizer threads stay out of the process that then holds the model (``AR_DISABLE_DATASET_SUBPROCESS=1``
    keeps them here)."""
    from .. import envs

    if envs.AR_DISABLE_DATASET_SUBPROCESS or tokenizer is None:
        return _specs_samples(specs, tokenizer, seqlen)
    import concurrent.futures
    import multiprocessing
    import pickle

    try:
        pickle.dumps(tokenizer)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(_specs_samples, specs, tokenizer, seqlen).result()
    except (AutoRoundError, KeyboardInterrupt):
        raise  # a real problem with the data (or the user stopping us): same error as in-process
    except Exception as exc:  # noqa: BLE001 - the child could not be started or the tokenizer not shipped
        logger.warning(
            "tokenizing the calibration data in this process instead of a child process (%s: %s); set "
            "AR_DISABLE_DATASET_SUBPROCESS=1 to choose this and silence the warning", type(exc).__name__, exc,
        )
        return _specs_samples(specs, tokenizer, seqlen)


def _samples_from_ids(
    seqs: list[list[int]], seqlen: int, concat: bool, eos: int | None
) -> list[list[int]]:
    if concat:
        stream: list[int] = []
        for s in seqs:
            stream.extend(s + ([eos] if eos is not None else []))
        return [stream[i : i + seqlen] for i in range(0, len(stream) - seqlen + 1, seqlen)]
    return [s[:seqlen] for s in seqs if len(s) >= seqlen]


def calibration_batch(
    dataset: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 42,
) -> torch.Tensor:
    """``[n, seqlen]`` int64 token ids, ``n <= nsamples``; deterministic for a seed."""
    if seqlen <= 0 or nsamples <= 0:
        raise DatasetError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    eos = getattr(tokenizer, "eos_token_id", None)
    samples: list[list[int]] = []
    if isinstance(dataset, str):
        samples = _tokenize_specs(parse_dataset_spec(dataset), tokenizer, seqlen)
    elif isinstance(dataset, torch.utils.data.DataLoader):
        for batch in dataset:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            samples.extend(torch.as_tensor(ids).reshape(-1, torch.as_tensor(ids).shape[-1]).tolist())
        samples = [s[:seqlen] for s in samples if len(s) >= seqlen]
    elif isinstance(dataset, (list, tuple)):
        if all(isinstance(x, str) for x in dataset):
            samples = _samples_from_ids(_tokenize(dataset, tokenizer), seqlen, False, eos)
        else:
            for x in dataset:
                ids = x["input_ids"] if isinstance(x, dict) else x
                ids = torch.as_tensor(ids).reshape(-1).tolist()
                if len(ids) >= seqlen:
                    samples.append(ids[:seqlen])
    else:
        raise DatasetError(
            f"dataset must be a spec string, a list of strings or token ids, or a DataLoader; got {type(dataset).__name__}"
        )
    if not samples:
        raise DatasetError(
            f"no calibration sample has {seqlen} tokens; use a smaller seqlen, more or longer texts, "
            "or ':concat=True' to join short texts"
        )
    rng = random.Random(seed)
    rng.shuffle(samples)
    if len(samples) < nsamples:
        logger.warning("only %d calibration samples of %d tokens are available (asked for %d)", len(samples), seqlen, nsamples)
    return torch.tensor(samples[:nsamples], dtype=torch.long)


def loss_mask(calib: torch.Tensor, pad_token_id: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` bool: the positions whose block outputs count in the tuning loss.

    As the reference tool does: the last position of every sample (it predicts nothing inside the sample) and
    padding are excluded; padding is the tokenizer's pad token, or, without one, a run of the same token that
    ends the sample (its first occurrence counts)."""
    mask = torch.ones_like(calib, dtype=torch.bool)
    if pad_token_id is not None:
        mask &= calib != pad_token_id
    else:
        for row, ids in zip(mask, calib):
            last, j = ids[-1], len(ids) - 2
            while j >= 0 and ids[j] == last:
                row[j + 1] = False
                j -= 1
    mask[:, -1] = False
    return mask
