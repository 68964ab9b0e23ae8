"""Several sessions' jobs in one CTranslate2 call: one batched encode, one batched generate, one batched
word alignment.

faster-whisper's `WhisperModel.transcribe` takes one audio at a time. Here a batch of jobs that agree on
their `BatchKey` (encoder frames, beam size, language) goes through the same steps `transcribe` takes for a
window that fits in 30 s (features, padding, prompt, generate at temperature 0, segments split at the
timestamp tokens, word timestamps), with every item decoded exactly as it would be alone: the encoder
sees the same frames whatever the neighbours (jobs of different lengths never share a call; windows come
in a few sizes, `BATCH_WINDOWS`, so that they can), and each item keeps its own token cap.

What a one-window pass cannot settle goes back to the sequential path, `model.transcribe`, for that job
alone: a result that needs temperature fallback (a final whose text loops or whose log-probability is
too low), one that a short window sent into a loop (`needs_full_window`), one whose language must be
detected, and one that Whisper left unfinished (faster-whisper would decode the rest in a second window).
`Batched.redone` counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import WhisperModel, get_compression_ratio, get_suppressed_tokens
from faster_whisper.utils import get_end

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.decoding import (
    FRAMES_PER_SECOND,
    FULL_WINDOW_FRAMES,
    BatchKey,
    Decoded,
    DecodeJob,
    JobPlan,
)
from jetscribe.services.transcriber.model import ShortWindowWhisper, max_new_tokens, needs_full_window, transcribe
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word

# faster-whisper's defaults for `transcribe`, which the sequential path uses.
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
COMPRESSION_RATIO_THRESHOLD = 2.4
MAX_INITIAL_TIMESTAMP_INDEX = 50  # 1.0 s / 0.02 s
UNHEARD_SPEECH_S = 0.3
PROMPT_TOKENS = 48  # about the last 40 words the session core hands over
PROMPT_STEP = 16  # shorter prompts are cut to a multiple of this, so that jobs early in a session batch too
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


class PromptTokens:
    """A job's context in tokens. CTranslate2 decodes a batch only if every prompt has the same length, so the
    batched path cuts every prompt to its last `PROMPT_TOKENS` tokens, or, early in a session when there are
    fewer, to the largest multiple of `PROMPT_STEP` there are: prompts come in a few lengths, each job's length
    depends on its own prompt only, and the length joins the batch key."""

    def __init__(self, model: WhisperModel, cached: int = 4096):
        self.model = model
        self.tokenizers: dict[str | None, Tokenizer] = {}
        self.tokens = lru_cache(maxsize=cached)(self._tokens)

    def tokenizer(self, language: str | None) -> Tokenizer:
        if language not in self.tokenizers:
            self.tokenizers[language] = Tokenizer(
                self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=language
            )
        return self.tokenizers[language]

    def _tokens(self, language: str | None, prompt: str) -> tuple[int, ...]:
        if not prompt.strip():
            return ()
        tokens = self.tokenizer(language).encode(" " + prompt.strip())
        keep = min(PROMPT_TOKENS, len(tokens) // PROMPT_STEP * PROMPT_STEP)
        return tuple(tokens[len(tokens) - keep :]) if keep else ()

    def plan_key(self, plan: JobPlan) -> tuple[BatchKey, int] | None:
        """The key `decoding.plan_batch` groups by: the plan's own, and its prompt's length in tokens."""
        key = plan.key
        return None if key is None else (key, len(self.tokens(plan.language, plan.prompt)))

    def job_key(self, job: DecodeJob) -> tuple[BatchKey, int] | None:
        return self.plan_key(JobPlan.of(job))


_PROMPTS: dict[int, PromptTokens] = {}


def prompts_of(model: WhisperModel) -> PromptTokens:
    """The one `PromptTokens` of a model (its cache is shared by the scheduler and the decoder)."""
    if id(model) not in _PROMPTS:
        _PROMPTS[id(model)] = PromptTokens(model)
    return _PROMPTS[id(model)]


def decode_jobs(model: Any, jobs: list[DecodeJob], max_batch: int) -> list[Decoded]:
    """What the worker calls: with `max_batch` 1, the sequential path (`model.transcribe`, one job); else one
    batched call, even for one job, so that a job's window never depends on how many others came with it.
    A job with no `batch_key` (its language is detected first) is decoded alone on the sequential path."""
    if isinstance(model, NullModel) and max_batch > 1:
        return model.decode_batch(jobs)
    if max_batch <= 1 or not isinstance(model, ShortWindowWhisper) or prompts_of(model).job_key(jobs[0]) is None:
        return [transcribe(model, job) for job in jobs]
    return decode_batch(model, jobs).results


@dataclass
class Batched:
    """The results of one batch, in the order of its jobs, and how many went back to the sequential path."""

    results: list[Decoded]
    redone: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass(eq=False)  # items are told apart by identity
class _Item:
    job: DecodeJob
    prompt: list[int]
    max_new: int
    features: np.ndarray
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    segments: list[dict[str, Any]] = field(default_factory=list)
    seek: int = 0  # where faster-whisper would start its next window, in frames
    single_ending: bool = True
    redo: str = ""  # why the sequential path must decode it, if it must

    @property
    def content_frames(self) -> int:
        return int(self.features.shape[-1]) - 1

    @property
    def segment_frames(self) -> int:
        return min(FULL_WINDOW_FRAMES, self.content_frames)


def decode_batch(model: ShortWindowWhisper, jobs: list[DecodeJob]) -> Batched:
    """Decode jobs that share one `batch_key` in one encode, one generate and one alignment."""
    if not jobs:
        return Batched([])
    prompts = prompts_of(model)
    full_key = prompts.job_key(jobs[0])
    if full_key is None or any(prompts.job_key(job) != full_key for job in jobs):
        raise ValueError("a batch needs jobs with one key (window, beam, language, prompt length)")
    key = full_key[0]
    tokenizer = prompts.tokenizer(key.language)
    items = [_item(model, tokenizer, job, list(prompts.tokens(job.language, job.prompt))) for job in jobs]
    encoder_output = WhisperModel.encode(model, np.stack([_window(item, key.frames) for item in items]))
    _generate(model, tokenizer, encoder_output, items, key.beam_size)
    for item in items:
        _judge(model, tokenizer, item)
    _align(model, tokenizer, encoder_output, items)
    results: list[Decoded] = []
    reasons: list[str] = []
    for item in items:
        _continues(item)
        decoded = Decoded(_segments(item), key.language, 1.0)
        if not item.redo and item.job.window == "short" and needs_full_window(decoded):
            item.redo = "loop on a short window"
        if item.redo:
            reasons.append(item.redo)
            decoded = transcribe(model, item.job)
        results.append(decoded)
    return Batched(results, len(reasons), reasons)


def _item(model: WhisperModel, tokenizer: Tokenizer, job: DecodeJob, previous: list[int]) -> _Item:
    prompt = model.get_prompt(tokenizer, previous, without_timestamps=False)
    max_new = max_new_tokens(len(job.audio))
    if len(prompt) + max_new > model.max_length:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new} new ones exceeds {model.max_length}")
    return _Item(job, prompt, max_new, model.feature_extractor(job.audio))


def _window(item: _Item, frames: int) -> np.ndarray:
    """The log-mel features faster-whisper's `transcribe` gives the encoder for this job's first window."""
    window = item.features[:, : item.segment_frames]
    padded = np.zeros((window.shape[0], FULL_WINDOW_FRAMES), dtype=window.dtype)
    padded[:, : window.shape[1]] = window
    return padded[:, :frames]


def _generate(model: WhisperModel, tokenizer: Tokenizer, encoder_output, items: list[_Item], beam_size: int) -> None:
    results = model.model.generate(
        encoder_output,
        [item.prompt for item in items],
        beam_size=beam_size,
        patience=1,
        length_penalty=1,
        repetition_penalty=1,
        no_repeat_ngram_size=0,
        # Each item's own cap is applied below; an item stopped by it is redone alone (`_judge`).
        max_length=max(len(item.prompt) + item.max_new for item in items),
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
    )
    for item, result in zip(items, results, strict=True):
        tokens = result.sequences_ids[0]
        item.tokens = tokens
        item.avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        item.no_speech_prob = result.no_speech_prob
        item.compression_ratio = get_compression_ratio(tokenizer.decode(tokens).strip())
        if len(tokens) > item.max_new:
            item.redo = "ran past its token cap in a longer batch"


def _judge(model: WhisperModel, tokenizer: Tokenizer, item: _Item) -> None:
    """What faster-whisper decides about one window's output: fallback, silence, segments."""
    if item.redo:
        return
    low_logprob = item.avg_logprob < LOG_PROB_THRESHOLD
    silence = item.no_speech_prob > NO_SPEECH_THRESHOLD and low_logprob
    if (
        item.job.kind == "final"
        and not silence
        and (item.compression_ratio > COMPRESSION_RATIO_THRESHOLD or low_logprob)
    ):
        item.redo = "temperature fallback"
        return
    if silence:
        return  # faster-whisper skips the window: no segments
    size = item.segment_frames
    segments, item.seek, item.single_ending = model._split_segments_by_timestamps(
        tokenizer=tokenizer,
        tokens=item.tokens,
        time_offset=0.0,
        segment_size=size,
        segment_duration=size * model.feature_extractor.time_per_frame,
        seek=0,
    )
    item.segments = [dict(s, seek=0, text=tokenizer.decode(s["tokens"])) for s in segments]


def _continues(item: _Item) -> None:
    """Would faster-whisper decode a second window here, and could it hear anything in it? It starts one
    after the last word whenever the output did not close with a single timestamp, which with a prompt is
    most of the time, and then decodes the job's trailing silence alone. A final is redone on the sequential
    path only when the VAD heard more than `UNHEARD_SPEECH_S` of speech after the last word; an interim, a
    guess replaced a second later, never is."""
    if item.redo or not item.segments or item.job.kind != "final":
        return
    seek = item.seek
    if not item.single_ending:
        end = get_end(item.segments)
        if end is not None and end > 0:
            seek = round(end * FRAMES_PER_SECOND)
    speech_end_s = (item.job.speech_end_sample - item.job.start_sample) / SAMPLE_RATE
    if seek < item.content_frames and speech_end_s - seek / FRAMES_PER_SECOND > UNHEARD_SPEECH_S:
        item.redo = "speech after the last word"


def _align(model: ShortWindowWhisper, tokenizer: Tokenizer, encoder_output, items: list[_Item]) -> None:
    """Word timestamps: one alignment call for the whole batch, then faster-whisper's word rules for each item
    on its own (called on a batch, they would carry one item's last word time into the next item's first)."""
    todo = [item for item in items if item.segments and not item.redo]
    if not todo:
        return
    text_tokens = [  # one row per encoder row; an item with nothing to align gets a placeholder row
        [t for s in item.segments for t in s["tokens"] if t < tokenizer.eot] or [tokenizer.eot - 1]
        if item in todo
        else [tokenizer.eot - 1]
        for item in items
    ]
    alignments = model.find_alignment(tokenizer, text_tokens, encoder_output, [i.segment_frames for i in items])
    try:
        for item, alignment in zip(items, alignments, strict=True):
            if item in todo:
                model.aligned = [alignment]
                model.add_word_timestamps(
                    [item.segments],
                    tokenizer,
                    encoder_output,
                    item.segment_frames,
                    PREPEND_PUNCTUATIONS,
                    APPEND_PUNCTUATIONS,
                    0.0,
                )
    finally:
        model.aligned = None


def _segments(item: _Item) -> list[DecodedSegment]:
    out = []
    for segment in item.segments:
        if segment["start"] == segment["end"] or not segment["text"].strip():
            continue
        words = segment.get("words") or []
        out.append(
            DecodedSegment(
                words=[Word(w["word"], w["start"], w["end"], w["probability"]) for w in words],
                no_speech_prob=item.no_speech_prob,
                avg_logprob=item.avg_logprob,
                compression_ratio=item.compression_ratio,
            )
        )
    return out


def plan_key_for(model: Any, max_batch: int) -> Callable[[JobPlan], Hashable | None]:
    """The worker's batch key: a Whisper model with batching on groups by window, beam, language and prompt
    length; the null model groups any jobs of one kind (it has no encoder); with one job at a time every job goes
    alone."""
    if max_batch > 1 and isinstance(model, ShortWindowWhisper):
        return prompts_of(model).plan_key
    if max_batch > 1 and isinstance(model, NullModel):  # no encoder: any jobs of one kind can go together
        return lambda plan: (plan.kind, plan.speculative)
    return lambda plan: None
