"""Turn detection for `/stt/turns/websocket`: when a user's turn starts and ends, and what they said in it.

**Activity.** Cartesia's thresholds are defined on one number, "the likelihood that the user is in an active
turn": `turn.start` when it rises above `start_threshold`, `turn.eager_end` / `turn.end` when it falls below
`eager_end_threshold` / `end_threshold`. We compute it per 32 ms VAD frame from two models:

- Outside a turn (and after an eager end), activity is the Silero speech probability, taken as the lowest of
  the last three frames (~96 ms), so a click or a breath does not open a turn: `turn.start` (or
  `turn.resume`) fires when speech has held above `start_threshold` for three frames.
- While the user speaks, activity is 1.
- Once they pause (three frames below the 0.5 speech line, ~100 ms), Smart Turn v3.2 scores the audio so far
  once (twice where decodes are cheap, below), giving `p_complete`, which the words then weigh. The pause's
  own Whisper decode gives `q`, Whisper's probability of `.`/`?`/`!` after the last word. Below 0.25 the words
  do not end a sentence and `p_complete` is halved for the first second of the pause: read speech often has
  falling, "final" intonation at commas, which Whisper does not take for a sentence end (after a second,
  prosody alone decides). Such a pause is decoded again, whole, ~320 ms in: the first decode ends at the
  pause's first silent frame and sometimes stops inside a softly ending last word or drops the full stop, and
  with more silence after the words Whisper hears the ending (only a sure sentence end, below, counts then).
  At 0.6 or more Whisper is sure the sentence ended, and unless Smart Turn is sure the speaker goes on
  (`p_complete` <= 0.2), `p_complete` is raised to at least 0.75, or 0.85 when it is above 0.5: Smart Turn,
  trained on conversation, scores many finished read sentences 0.2-0.8. Activity then decays with the silence:

      activity = (1 - p_complete) * max(0, 1 - silence_ms / end_timeout_ms)

  A confident "complete" (p_complete > 0.8 with the default end threshold 0.2) gives an eager end at once and
  the end once the pause has lasted 192 ms (shorter pauses are breaths); an unsure one (0.6 < p < 0.8) gives
  an eager end now and the end within half the timeout; a "not complete" ends only as the silence nears
  `end_timeout_ms`, which is therefore the longest wait, whatever the model says. Speech resuming resets the
  pause (and the decay); after an eager end that is `turn.resume`.

**The pause decode starts early and hears only the tail.** `turn.eager_end` and `turn.end` carry the
transcript, so they wait for the pause's decode: it is begun at the pause's first silent frame (two frames
before the pause is confirmed; skipped if speech resumes before a worker takes it) and, when the unsent tail
is short, decodes only that tail plus 0.6 s of context whose sent words are forced as Whisper's prefix (see
`_hear`). The frequent `turn.update` decodes may use a smaller model (`update_recognizer`); the pause decode
uses the session's model unless configured otherwise (`recognizer`), since its words end the turn and its
full-stop probability judges the sentence end (tiny.en there halves the wait on a CPU but costs WER on harder
audio; see the README). No update decode starts while the speaker is silent: it would share the CPU with the
pause decode (sessions of the 20 benchmark sentences, interleaved with and without: `turn.end` p50 420 against
451 ms).

**Where decodes are cheap, a pause is scored twice** (`early_score`, on by default when the pause decode runs
on a GPU): at its first silent frame, with that frame's decode, for `turn.eager_end`, and again when it is
confirmed two frames later, with the same words, for `turn.end`. On a GPU the wait for `turn.eager_end` is
listening, not decoding, and the third silent frame often arrives in the next message; an end judged on the
first frame's score alone came late when Smart Turn heard the ending less surely that early. On a CPU the
decode is the wait, and scoring every one-frame dip between words would make each wait for its decode.

**Decisions follow the audio, not the clock.** Every decision is made while ingesting a frame, and a pause's
Smart Turn score and decode are awaited before the next frame is looked at, so the same audio gives the same
turns whether it arrives in real time or ten times faster. `TurnDetector` holds that logic, pure and
synchronous; `TurnSession` feeds it and does the decoding.

**Transcripts are never revised.** Within a turn, text goes out only once it is stable: the words on which two
successive decodes agree, less the last one. Later decodes keep the sent words verbatim and contribute only
what follows them (by position when they agree with them, else by word time), so text can only be extended; at
a pause the whole decode goes out with `turn.eager_end` / `turn.end`, and a `turn.end` after `turn.eager_end`
with no `turn.resume` repeats its text (see `_end`). Events are a FIFO of coroutines run one at a time by the
sender, so text state changes in wire order; a pause's decode runs beside an update in flight and is spliced
onto the sent text only when its event goes out. A turn's transcript starts with a space when an earlier turn
carried text, so the session transcript is the plain concatenation of the `turn.end` transcripts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

from stenograph import metrics
from stenograph.asr import Engine, Recognizer, Transcription
from stenograph.audio import SAMPLE_RATE, PcmDecoder
from stenograph.errors import ApiError, bad_request
from stenograph.scheduler import JobSkipped, Priority
from stenograph.streaming import ready
from stenograph.vad import FRAME, SPEECH_THRESHOLD

SUSTAIN_FRAMES = 3  # frames above start_threshold that open (or resume) a turn
PAUSE_FRAMES = 3  # silent frames before a pause is scored
END_HOLD_FRAMES = 6  # ~190 ms: the shortest pause that can end a turn (shorter ones are breaths)
UNFINISHED_WEIGHT = 0.5  # p_complete counts half when the words so far do not end a sentence ...
UNFINISHED_HOLD_FRAMES = 31  # ... for the first second of the pause (Whisper drops some final full stops)
# ~320 ms into such a pause its audio is decoded again, with that much silence after the words: a decode that
# ends at the pause's first silent frame sometimes stops inside a softly ending last word ("…of the broth").
RELOOK_FRAMES = 10
LEAD_IN_SECONDS = 0.5  # audio kept before the frame that opened a turn
SMART_TURN_SECONDS = 8.0
ENDING_WORDS = 2  # sent words a decode that heard them differently must repeat verbatim to splice after them,
ENDING_SLACK = 1.0  # ending this close (s) to where they were heard before
HOLDBACK_WORDS = 1  # the newest agreed word is not sent until a later decode confirms what follows it
PROMPT_WORDS = 20  # sent words given to Whisper as the text before a tail window
COVERAGE_SLACK = 0.6  # a pause decode whose last word ends this long before the speech did stopped early
MAX_COVER_RETRIES = 2  # decodes of what such a whole-segment decode left unheard
MAX_TAIL_SECONDS = 4.0  # pause decodes hear only the unsent tail (and its context) when it is this short
CONTEXT_SECONDS = 0.6  # sent audio a tail decode hears before the unsent part, with its words as prefix
# Whisper's probability of `.`/`?`/`!` after a pause decode's last word at or above which the words end a
# sentence (see `Heard.sentence_end`) ...
SENTENCE_END_PROBABILITY = 0.25
CONFIDENT_SENTENCE_END = 0.6  # ... and at or above which the words make the pause a likely turn end,
GOING_ON = 0.2  # unless Smart Turn's p_complete is at most this (it hears the speaker going on):
# p_complete is then at least WORDS_COMPLETE (with the default thresholds, `turn.eager_end` at once and
# `turn.end` after 1.1 s of silence, since a clause that ends a sentence is often followed by more), and at
# least BOTH_COMPLETE (`turn.end` at once) when Smart Turn leans to "complete" too (see the README).
WORDS_COMPLETE = 0.75
BOTH_COMPLETE = 0.85
LEANS_COMPLETE = 0.5
FRAME_MS = FRAME * 1000 / SAMPLE_RATE

START, UPDATE, EAGER_END, RESUME, END = (
    "turn.start",
    "turn.update",
    "turn.eager_end",
    "turn.resume",
    "turn.end",
)

# Spec 3.1 ranges (inclusive).
START_RANGE = (0.5, 0.9)
EAGER_END_RANGE = (0.3, 0.6)
END_RANGE = (0.05, 0.5)
END_TIMEOUT_RANGE = (640.0, 11200.0)


# -- parameters ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnParams:
    start_threshold: float = 0.8
    eager_end_threshold: float = 0.4
    end_threshold: float = 0.2
    end_timeout_ms: float = 5600.0

    def checked(self) -> TurnParams:
        """Ranges from the spec, and the strict order start > eager_end > end."""
        for name, (lo, hi) in (
            ("start_threshold", START_RANGE),
            ("eager_end_threshold", EAGER_END_RANGE),
            ("end_threshold", END_RANGE),
            ("end_timeout_ms", END_TIMEOUT_RANGE),
        ):
            value = getattr(self, name)
            if not (lo <= value <= hi):
                raise bad_request(
                    f"turn_{name} must be between {lo:g} and {hi:g}, got {value:g}", title="Invalid parameter"
                )
        if not (self.start_threshold > self.eager_end_threshold > self.end_threshold):
            raise bad_request(
                "turn thresholds must be ordered start > eager_end > end, got "
                f"{self.start_threshold:g} / {self.eager_end_threshold:g} / {self.end_threshold:g}",
                title="Invalid parameter",
            )
        return self

    def updated(self, changes: dict[str, float]) -> TurnParams:
        return replace(self, **changes).checked()


# -- the state machine of spec 3.4 ------------------------------------------------------------------------


class TurnState(Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    EAGER_ENDED = "eager_ended"


TRANSITIONS: dict[tuple[TurnState, str], TurnState] = {
    (TurnState.IDLE, START): TurnState.SPEAKING,
    (TurnState.SPEAKING, EAGER_END): TurnState.EAGER_ENDED,
    (TurnState.SPEAKING, END): TurnState.IDLE,
    (TurnState.EAGER_ENDED, RESUME): TurnState.SPEAKING,
    (TurnState.EAGER_ENDED, END): TurnState.IDLE,
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class TurnStateMachine:
    state: TurnState = TurnState.IDLE
    previous: TurnState = TurnState.IDLE  # the state the last event left

    def apply(self, event: str) -> TurnState:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(f"{event} is not allowed in state {self.state.value}")
        self.previous, self.state = self.state, nxt
        return nxt


# -- decisions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckTurn:
    """Ask, for the pause numbered `pause`, for Smart Turn's score of the audio up to now (`score`) and for
    the words heard up to now (`words`). A pause's first check asks for both; a relook for the words again
    (the score stands); an early-scored pause's rescore for the score again (the words stand)."""

    pause: int
    score: bool = True
    words: bool = True


Action = str | CheckTurn  # a turn event name, or a request for a score


class TurnDetector:
    """Frame-by-frame turn decisions (see the module docstring); knows nothing of audio or text."""

    def __init__(self, params: TurnParams, early_score: bool = False) -> None:
        self.params = params
        self.machine = TurnStateMachine()
        # With `early_score`, a pause is scored at its first silent frame, for `turn.eager_end`, and again
        # once confirmed, for `turn.end` (see the module docstring).
        self.first_check = 1 if early_score else PAUSE_FRAMES
        self.pause = 0  # id of the current (or last) pause, from its first silent frame; others are stale
        self.silence = 0  # consecutive frames below the speech line
        self._recent: deque[float] = deque(maxlen=SUSTAIN_FRAMES)
        self._p_complete: float | None = None
        self._sentence_end = SENTENCE_END_PROBABILITY

    @property
    def state(self) -> TurnState:
        return self.machine.state

    @property
    def paused(self) -> bool:
        return self.state is not TurnState.IDLE and self.silence >= self.first_check

    def frame(self, prob: float) -> list[Action]:
        self._recent.append(prob)
        sustained = len(self._recent) == SUSTAIN_FRAMES and min(self._recent) >= self.params.start_threshold
        if prob >= SPEECH_THRESHOLD:
            self.silence = 0
        else:
            self.silence += 1
            if self.silence == 1:
                self.pause += 1
        state = self.state
        if state is TurnState.IDLE:
            return self._emit(START) if sustained else []
        if state is TurnState.EAGER_ENDED and sustained:
            return self._emit(RESUME)
        if self.silence < self.first_check:
            return []
        actions: list[Action] = []
        if self.silence == self.first_check:
            self._p_complete, self._sentence_end = None, SENTENCE_END_PROBABILITY
            actions.append(CheckTurn(self.pause))
        elif self.silence == PAUSE_FRAMES:
            actions.append(CheckTurn(self.pause, words=False))
        elif (
            self.silence == RELOOK_FRAMES
            and self.state is TurnState.SPEAKING
            and self._sentence_end < SENTENCE_END_PROBABILITY
        ):
            actions.append(CheckTurn(self.pause, score=False))
        return actions + self._judge()

    def turn_probability(
        self, pause: int, p_complete: float, sentence_end: float | None = SENTENCE_END_PROBABILITY
    ) -> list[Action]:
        """Smart Turn's score for `pause`, weighed by how likely the transcript so far ends a sentence
        (None: as the pause's words said before)."""
        if pause != self.pause or not self.paused:
            return []
        self._p_complete = p_complete
        if sentence_end is not None:
            self._sentence_end = sentence_end
        return self._judge()

    def sentence_end(self, pause: int, sentence_end: float) -> list[Action]:
        """The words of `pause` heard again, with the same score. Only a sure sentence end counts: taking
        any new probability of 0.25 or more cut one more of 80 inserted mid-sentence pauses (README)."""
        if pause != self.pause or not self.paused:
            return []
        if sentence_end >= CONFIDENT_SENTENCE_END:
            self._sentence_end = sentence_end
        return self._judge()

    def finish(self) -> list[Action]:
        """End of the stream: an open turn ends now."""
        return [] if self.state is TurnState.IDLE else self._emit(END)

    def configure(self, params: TurnParams) -> list[Action]:
        self.params = params
        return self._judge() if self.paused else []

    def activity(self) -> float:
        if self.state is TurnState.IDLE:
            return min(self._recent, default=0.0)
        if not self.paused:
            return 1.0
        silence_ms = self.silence * FRAME_MS
        decay = max(0.0, 1.0 - silence_ms / self.params.end_timeout_ms)
        return (1.0 - self._weighed_p_complete()) * decay

    def _weighed_p_complete(self) -> float:
        """Smart Turn's `p_complete` weighed by Whisper's sentence-end probability (module docstring)."""
        p = self._p_complete or 0.0
        if self._sentence_end < SENTENCE_END_PROBABILITY:
            return p * UNFINISHED_WEIGHT if self.silence < UNFINISHED_HOLD_FRAMES else p
        if self._sentence_end >= CONFIDENT_SENTENCE_END and p > GOING_ON:
            return max(p, BOTH_COMPLETE if p > LEANS_COMPLETE else WORDS_COMPLETE)
        return p

    def _judge(self) -> list[Action]:
        activity = self.activity()
        if activity < self.params.end_threshold and self.silence >= END_HOLD_FRAMES:
            return self._emit(END)
        if activity < self.params.eager_end_threshold and self.state is TurnState.SPEAKING:
            return self._emit(EAGER_END)
        return []

    def _emit(self, event: str) -> list[Action]:
        self.machine.apply(event)
        if event in (START, RESUME, END):
            self._recent.clear()
            self._p_complete = None
        return [event]


# -- the session ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnConfig:
    model_id: str
    encoding: str
    sample_rate: int
    params: TurnParams = TurnParams()
    keyterms: tuple[str, ...] = ()
    update_interval: float = 1.0  # seconds of new turn audio between transcript updates
    max_segment: float = 20.0  # a turn longer than this is decoded in pieces, cut after a sent word
    max_backlog: float = 120.0
    beam_size: int = 1
    early_score: bool = False  # score each pause at its first silent frame too (where decodes are cheap)


@dataclass(frozen=True)
class TurnEvent:
    """What the session tells the transport; `transcript` is None for `turn.start` / `turn.resume`."""

    kind: str
    transcript: str | None = None


@dataclass
class _Turn:
    """One turn's text state. Changed only by the output coroutines, i.e. in wire order."""

    seg_start: int  # absolute sample index where the open segment begins (first: the turn's lead-in)
    lead: str = ""  # " " when an earlier turn carried text
    sealed: str = ""  # text of earlier segments, all final
    sent: Timed = field(default_factory=list)  # the open segment's words already on the wire
    previous: list[str] | None = None  # the words of the last update decode of the open segment
    heard: Heard | None = None  # the decode made at the latest pause

    @property
    def words_end(self) -> int:
        """Absolute sample index after the last sent word: where the unsent audio begins."""
        return self.sent[-1][2] if self.sent else self.seg_start

    def transcript(self) -> str:
        text = _join(self.sealed, _text(self.sent))
        return (self.lead + text) if text else ""


Item = Coroutine[Any, Any, TurnEvent | None]
Timed = list[tuple[str, int, int]]  # (word, start sample, end sample), absolute sample indices


@dataclass(frozen=True)
class Heard:
    """One decode's words. Spliced onto the sent text only when used, since an update may have sent more
    words in between."""

    pause: int  # the pause it was made at (-1: none)
    seg_start: int  # the segment it belongs to
    first: int  # the sent word its audio starts with: 0, or a tail decode's first context word
    words: Timed
    end_probability: float | None = None  # Whisper's probability of a sentence end after the last word

    def sentence_end(self, text: str) -> float:
        """How likely the words so far end a sentence: Whisper's own probability of a full stop after the
        last word, when the decode has one. A short window often ends without the full stop Whisper still
        rates likely there: 3 of the 20 benchmark sentences printed none at their real end, where the
        probability was 0.36-0.68; at inserted mid-sentence pauses the probability and the printed
        punctuation let about as few through (4 against 3 of 60). Without a probability, the printed
        punctuation of `text` (the turn's transcript with these words spliced on) says ended, never sure."""
        if self.end_probability is None or not self.words:
            return SENTENCE_END_PROBABILITY if ends_sentence(text) else 0.0
        return self.end_probability


@dataclass
class _Early:
    """The decode for a pause that may be starting: begun at its first silent frame, ~100 ms before the
    pause is confirmed, since that decode is what `turn.eager_end` / `turn.end` wait for."""

    turn: _Turn
    pause: int
    task: asyncio.Future[Heard]


class TurnSession:
    """One connection: audio in, decisions from the detector, ordered turn events out."""

    def __init__(
        self,
        engine: Engine,
        recognizer: Recognizer,
        config: TurnConfig,
        update_recognizer: Recognizer | None = None,
    ) -> None:
        self.engine = engine
        self.recognizer = recognizer
        # `turn.update` decodes: most of a session's model time, so a smaller model may serve them.
        self.update_recognizer = update_recognizer or recognizer
        self.config = config
        self.outputs: asyncio.Queue[Awaitable[TurnEvent | None]] = asyncio.Queue()
        self.detector = TurnDetector(config.params, config.early_score)
        self._decoder = PcmDecoder(config.encoding, config.sample_rate)
        self._vad = engine.vad.stream()
        self._smart_turn = engine.smart_turn
        self._hotwords = ", ".join(config.keyterms) or None
        self._chunks: list[np.ndarray] = []
        self._buf_start = 0  # absolute sample index of the first buffered sample
        self._buffered = 0
        self._framed = 0  # samples the VAD has turned into frames
        self._turn: _Turn | None = None  # the turn being decided (frame side)
        self._last_end = 0  # absolute sample index where the last turn ended; the next lead-in starts after
        self._live: list[_Turn] = []  # turns whose end has not been sent yet (their audio must stay)
        self._last_update_at = 0
        self._update_pending = False
        self._early: _Early | None = None
        self._last_speech = 0  # absolute sample index after the last speech frame
        self._said_anything = False  # has any turn.end carried text (output side)?
        self._last_speech_at = time.monotonic()

    # -- input -------------------------------------------------------------------------------------------

    async def feed(self, data: bytes) -> None:
        samples = self._decoder.feed(data)
        if samples.size:
            await self._ingest(samples)

    async def finish(self) -> None:
        """`close`: flush the decoder, then end an open turn with everything heard."""
        tail = self._decoder.flush()
        if tail.size:
            await self._ingest(tail)
        self._apply(self.detector.finish(), self._buf_start + self._buffered)

    def configure(self, changes: dict[str, float]) -> None:
        params = self.detector.params.updated(changes)
        self._apply(self.detector.configure(params), self._framed)

    async def _ingest(self, samples: np.ndarray) -> None:
        self._chunks.append(samples)
        self._buffered += samples.size
        for prob in self._vad.feed(samples):
            self._framed += FRAME
            if prob >= SPEECH_THRESHOLD:
                self._last_speech_at = time.monotonic()
                self._last_speech = self._framed
            pending = deque(self.detector.frame(float(prob)))
            if self.detector.silence == 1 and self._turn is not None:
                self._begin_early(self._turn)
            while pending:
                action = pending.popleft()
                if isinstance(action, CheckTurn):
                    pending.extend(await self._check(action, self._framed))
                else:
                    self._apply([action], self._framed)
            self._maybe_update()
        self._trim()

    def _begin_early(self, turn: _Turn) -> None:
        """Start the decode of the pause that may be beginning (it is confirmed PAUSE_FRAMES later). If the
        speech goes on before a worker takes it, it is skipped; if it already ran, the result is dropped."""
        pause = self.detector.pause

        def stale() -> bool:
            return self._early is not early or self.detector.silence == 0

        task = asyncio.ensure_future(self._hear(turn, self._framed, Priority.FINAL, pause, stale))
        task.add_done_callback(_consume)
        early = self._early = _Early(turn, pause, task)

    async def _check(self, check: CheckTurn, upto: int) -> list[Action]:
        """Score a pause: Smart Turn on the last 8 s and a decode of the turn so far (begun at the pause's
        first silent frame), both awaited before the next frame is looked at, so decisions depend on the
        audio alone (not on how fast it arrives). `turn.eager_end`/`turn.end` reuse the decode. A relook
        decodes the turn again, up to now, and keeps the score; a rescore keeps the words."""
        turn, pause = self._require_turn(), check.pause
        score = None
        if check.score:
            audio = self._slice(upto - int(SMART_TURN_SECONDS * SAMPLE_RATE), upto)
            score = asyncio.ensure_future(asyncio.to_thread(self._smart_turn.probability, audio))
        if not check.words:
            assert score is not None
            return self.detector.turn_probability(pause, await score, sentence_end=None)
        early = self._early
        try:
            if check.score and early is not None and early.turn is turn and early.pause == pause:
                turn.heard = await early.task
            else:
                turn.heard = await self._hear(turn, upto, Priority.FINAL, pause, whole=not check.score)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(500, "internal_error", "Internal error", "transcription failed") from exc
        sentence_end = turn.heard.sentence_end(_text(self._splice(turn, turn.heard)))
        if score is None:
            return self.detector.sentence_end(pause, sentence_end)
        return self.detector.turn_probability(pause, await score, sentence_end)

    def _apply(self, actions: list[Action], upto: int) -> None:
        # A pause decode stands for the turn's audio only if nothing was said after it: the detector is
        # still in the pause it was made for (`silence` is not reset by the end itself).
        pause = self.detector.pause if self.detector.silence >= self.detector.first_check else -1
        for action in actions:
            if action == START:
                lead_in = upto - SUSTAIN_FRAMES * FRAME - int(LEAD_IN_SECONDS * SAMPLE_RATE)
                start = max(self._buf_start, self._last_end, lead_in)
                turn = _Turn(seg_start=start)
                self._turn, self._last_update_at = turn, upto
                self._live.append(turn)
                self._enqueue(self._started(turn))
            elif action == EAGER_END:
                self._enqueue(self._eager_end(self._require_turn(), pause, upto))
            elif action == RESUME:
                self._enqueue(ready(TurnEvent(RESUME)))
            elif action == END:  # always the last action: the machine's previous state is the one it ended
                after_eager = self.detector.machine.previous is TurnState.EAGER_ENDED
                self._enqueue(self._end(self._require_turn(), pause, upto, after_eager))
                self._turn, self._last_end = None, upto

    def _require_turn(self) -> _Turn:
        assert self._turn is not None, "the detector acted on a turn the session did not open"
        return self._turn

    def _maybe_update(self) -> None:
        turn = self._turn
        if turn is None or self._update_pending or self.detector.silence > 0:
            return  # a silent frame may begin a pause, whose own decode must not share the CPU with an update
        if self.detector.state is TurnState.EAGER_ENDED:
            return  # until the speaker resumes, the text stays as `turn.eager_end` sent it (see `_end`)
        if self._framed - self._last_update_at < self.config.update_interval * SAMPLE_RATE:
            return
        if self.engine.scheduler.depth_at_or_above(Priority.INTERIM) >= self.engine.settings.workers:
            return  # under load, updates wait: turn ends and batch work come first
        self._last_update_at = self._framed
        self._update_pending = True
        self._enqueue(self._update(turn, self._framed))

    def _enqueue(self, item: Item) -> None:
        self.outputs.put_nowait(item)

    # -- audio buffer ------------------------------------------------------------------------------------

    def _slice(self, start: int, end: int) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        buf = self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)
        lo = max(0, start - self._buf_start)
        return buf[lo : max(lo, end - self._buf_start)]

    def _trim(self) -> None:
        """Keep the audio that live turns and the next turn's lead-in can still need; bound the rest."""
        now = self._buf_start + self._buffered
        keep = now - int(SMART_TURN_SECONDS * SAMPLE_RATE)  # also covers the next turn's lead-in
        if self._live:
            oldest = min(t.seg_start for t in self._live)
            if (now - oldest) / SAMPLE_RATE > self.config.max_backlog:
                raise ApiError(
                    429,
                    "rate_limited",
                    "Audio backlog exceeded",
                    f"more than {self.config.max_backlog:g} s of audio is waiting to be transcribed; "
                    "send audio in real time",
                )
            keep = min(keep, oldest)
        drop = keep - self._buf_start
        if drop <= 0:
            return
        buf = self._slice(self._buf_start, now)
        self._chunks = [buf[drop:]]
        self._buf_start += drop
        self._buffered -= drop

    # -- outputs (run one at a time, in order, by the sender) --------------------------------------------

    async def _started(self, turn: _Turn) -> TurnEvent:
        turn.lead = " " if self._said_anything else ""
        return TurnEvent(START)

    async def _update(self, turn: _Turn, upto: int) -> TurnEvent | None:
        self._update_pending = False
        if turn not in self._live:
            return None
        if turn is self._turn and self.detector.paused:
            return None  # the pause's own decode is on its way
        try:
            words = self._splice(turn, await self._hear(turn, upto, Priority.INTERIM))
        except JobSkipped:
            return None
        before = turn.transcript()
        plain = [w for w, _, _ in words]
        if turn.previous is not None:
            stable = min(_common_prefix(turn.previous, plain), len(words) - HOLDBACK_WORDS)
            if stable > len(turn.sent):
                turn.sent = words[:stable]
        turn.previous = plain
        if (upto - turn.seg_start) / SAMPLE_RATE > self.config.max_segment and turn.sent:
            turn.sealed = _join(turn.sealed, _text(turn.sent))
            turn.seg_start, turn.sent, turn.previous = turn.words_end, [], None
        after = turn.transcript()
        return TurnEvent(UPDATE, after) if after != before else None

    async def _send_all(self, turn: _Turn, pause: int, upto: int) -> None:
        """Everything said in the open segment up to the pause becomes sent text (from the pause's own
        decode when it is still valid)."""
        heard = turn.heard
        if heard is None or heard.pause != pause or heard.seg_start != turn.seg_start:
            heard = await self._hear(turn, upto, Priority.FINAL)
        turn.sent = self._splice(turn, heard)

    async def _eager_end(self, turn: _Turn, pause: int, upto: int) -> TurnEvent:
        await self._send_all(turn, pause, upto)
        turn.previous = None
        return TurnEvent(EAGER_END, turn.transcript())

    async def _end(self, turn: _Turn, pause: int, upto: int, after_eager: bool) -> TurnEvent:
        """`after_eager`: the speaker did not resume after `turn.eager_end`, so the end carries its text
        verbatim. A sound heard in between, too short to resume the turn, is not transcribed into it: it
        was most often the soft tail of the last word, which a decode heard as a word again (on a GPU,
        "…with hope. Than apprehension. In apprehension."), and LiveKit keeps the reply it began at the
        eager end only when the final text is the identical string."""
        try:
            if not after_eager:
                await self._send_all(turn, pause, upto)
        finally:
            self._live.remove(turn)
        text = turn.transcript()
        self._said_anything = self._said_anything or bool(text)
        # Wall time from the last speech frame received to this `turn.end`: what an agent waits to reply.
        metrics.observe_turn_end(time.monotonic() - self._last_speech_at)
        return TurnEvent(END, text)

    async def _hear(
        self,
        turn: _Turn,
        end: int,
        priority: Priority,
        pause: int = -1,
        stale: Callable[[], bool] | None = None,
        whole: bool = False,
    ) -> Heard:
        """Decode what the open segment says after its sent words, up to `end` (`whole`: all of it).

        A pause decode is what `turn.eager_end` / `turn.end` wait for, so when the unsent part is short it
        hears only that part plus CONTEXT_SECONDS of context before it, with the context's sent words
        forced as Whisper's prefix and the earlier ones as its prompt. On 60 LibriSpeech clips with the last
        2.5-3.5 s unsent this scored 8.6 % WER (1 s of context), against 8.4 % for a decode of the whole
        segment spliced the same way; without the context (the window starting at the last sent word,
        prompted) it was 8.9 %, and 11 % in live sessions, since a window cut at a word boundary often
        mishears its first word. A forced prefix costs a decoder step per token, like generated text, hence
        only 0.6 s of it. Such a decode occasionally stops at a full stop and ignores the rest: when its
        words end well before the speech did, the whole segment is decoded instead. Updates always decode
        the whole segment (on the update model): the sent text is built from them, and chaining short
        windows cost 2 WER points.
        """
        if stale is None and priority is Priority.INTERIM:

            def superseded() -> bool:
                """An update not begun when the speaker falls silent is skipped: a pause decode is coming."""
                return turn not in self._live or (turn is self._turn and self.detector.silence > 0)

            stale = superseded
        short = end - turn.words_end <= MAX_TAIL_SECONDS * SAMPLE_RATE
        if turn.sent and short and priority is Priority.FINAL and not whole:
            k = _context_start(turn.sent, turn.words_end - int(CONTEXT_SECONDS * SAMPLE_RATE))
            said = _join(turn.sealed, _text(turn.sent[:k]))
            context = turn.sent[k:]
            heard = await self._decode(turn, context[0][1], end, priority, pause, said, stale, context)
            if heard.words and self._covers(heard, end):
                return heard
        # A decode of the whole segment gets only earlier segments' text: given the words it is about to
        # hear as the text before it (rather than as a prefix), Whisper skips them.
        heard = await self._decode(turn, turn.seg_start, end, priority, pause, turn.sealed, stale)
        if priority is Priority.FINAL:
            heard = await self._cover(turn, heard, end, pause, stale)
        return heard

    async def _cover(
        self, turn: _Turn, heard: Heard, end: int, pause: int, stale: Callable[[], bool] | None
    ) -> Heard:
        """A whole-segment decode can stop at a long silence inside the turn and leave the speech after it
        unheard (whisper-tiny.en did at 1.5 s, and the turn ended without its second sentence): what
        follows its last word is decoded on its own. Not with those words as its prompt: Whisper then skips
        words it is about to hear again (a speaker starting the sentence over)."""
        for _ in range(MAX_COVER_RETRIES):
            if not heard.words or self._covers(heard, end):
                break
            start = heard.words[-1][2]
            more = await self._decode(turn, start, end, Priority.FINAL, pause, turn.sealed, stale)
            if not more.words:
                break
            heard = replace(heard, words=[*heard.words, *more.words], end_probability=more.end_probability)
        return heard

    def _covers(self, heard: Heard, end: int) -> bool:
        """Do the decode's words reach (nearly) as far as the speech before `end`? A last word ending
        COVERAGE_SLACK before it means Whisper stopped early (the aligner puts last word ends up to 0.4 s
        early)."""
        speech_end = min(end, self._last_speech)
        return heard.words[-1][2] >= speech_end - COVERAGE_SLACK * SAMPLE_RATE

    async def _decode(
        self,
        turn: _Turn,
        start: int,
        end: int,
        priority: Priority,
        pause: int,
        said: str,
        stale: Callable[[], bool] | None,
        context: Timed | None = None,
    ) -> Heard:
        """Decode `start`..`end`; `said` is the text before it, `context` the sent words it opens with."""
        first = len(turn.sent) - len(context) if context else 0
        heard = Heard(pause, turn.seg_start, first, [])
        audio = self._slice(start, end)
        if audio.size < FRAME:
            return heard
        beam, prompt = self.config.beam_size, " ".join(said.split()[-PROMPT_WORDS:]) or None
        prefix = _text(context or []) or None
        update = priority is Priority.INTERIM
        recognizer = self.update_recognizer if update else self.recognizer

        def job() -> Transcription:
            return recognizer.decode_utterance(
                audio, "en", beam, 0.0, self._hotwords, prompt, prefix=prefix, end_probability=not update
            )

        result: Transcription = await self.engine.scheduler.run(job, priority, stale)
        words = [
            (w.word, start + int(w.start * SAMPLE_RATE), start + int(w.end * SAMPLE_RATE))
            for w in result.words
        ] or [(word, end, end) for word in result.text.split()]
        return replace(heard, words=words, end_probability=result.end_probability)

    @staticmethod
    def _splice(turn: _Turn, heard: Heard) -> Timed:
        """The open segment's words: the sent ones verbatim, then what `heard` adds after them."""
        return extend_sent(turn.sent, turn.words_end, heard.words, heard.first)

    def cancel(self) -> None:
        """The connection is over (or its sender failed): drop the queued work."""
        while not self.outputs.empty():
            item = self.outputs.get_nowait()
            if asyncio.iscoroutine(item):
                item.close()


def extend_sent(sent: Timed, sent_end: int, decoded: Timed, first: int = 0) -> Timed:
    """The sent words, verbatim, then what a new decode heard after them.

    The decode's audio starts with sent word `first` (0 for a decode of the whole segment, later for a
    tail decode with context); more words may have been sent since it was made. When it agrees with the
    sent words from `first` on (ignoring case and punctuation) the rest follows by position. Otherwise
    (heard differently, or split into words another way) the continuation starts after the decode's own copy
    of the last sent words when it has one ("…dominion that the" for the sent "…dominions that the"), else
    with the words centred after the last sent word's end. Word times come from different decodes, so a sent
    word's end can reach into the next word, which the times alone then dropped (seen live: "that the
    sailorman was" became "that the was"). Either way, the last sent word heard again where it was said is
    not a new word: cut short by the end of its window then and heard whole now, or said once more after a
    forced prefix that already holds it (Whisper sometimes transcribes the prefix's last word a second time).
    """
    opening = [_plain(w) for w, _, _ in sent[first:]]
    heard = [_plain(w) for w, _, _ in decoded]
    if heard[: len(opening)] == opening:
        rest = decoded[len(opening) :]
    elif (after := _after_ending(opening, heard, decoded, sent_end)) is not None:
        rest = decoded[after:]
    else:
        rest = [d for d in decoded if (d[1] + d[2]) / 2 > sent_end]
    if rest and sent and _plain(rest[0][0]) == _plain(sent[-1][0]) and rest[0][1] < sent_end:
        rest = rest[1:]
    return [*sent, *rest]


def _after_ending(opening: list[str], heard: list[str], decoded: Timed, sent_end: int) -> int | None:
    """Index in `decoded` (whose plain words are `heard`) just after its copy of the last ENDING_WORDS words
    of `opening`: the only copy that ends within ENDING_SLACK seconds of where the sent words end."""
    ending = opening[-ENDING_WORDS:]
    if len(ending) < ENDING_WORDS:
        return None
    found = [
        i + len(ending)
        for i in range(len(heard) - len(ending) + 1)
        if heard[i : i + len(ending)] == ending
        and abs(decoded[i + len(ending) - 1][2] - sent_end) <= ENDING_SLACK * SAMPLE_RATE
    ]
    return found[0] if len(found) == 1 else None


def _text(words: Timed) -> str:
    return " ".join(w for w, _, _ in words)


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _context_start(sent: Timed, at: int) -> int:
    """Index of the last sent word that starts at or before `at` (0 if none): a tail decode's context."""
    k = 0
    for i, (_, start, _) in enumerate(sent):
        if start <= at:
            k = i
    return k


def _consume(task: asyncio.Future[Heard]) -> None:
    """An early decode nobody awaited (the speech went on) must not log "exception never retrieved"."""
    if not task.cancelled():
        task.exception()


def _plain(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


def ends_sentence(text: str) -> bool:
    """Does the transcript end a sentence? Whisper punctuates by prosody and sense, so a mid-sentence pause
    rarely ends in `.`/`?`/`!`; an empty one (a cough) is left to Smart Turn alone."""
    text = text.rstrip("\"')]” ")
    return not text or (text.endswith((".", "?", "!")) and not text.endswith(".."))


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
