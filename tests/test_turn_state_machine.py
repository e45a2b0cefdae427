"""The turn state machine of spec 3.4, the frame-by-frame detector, and the session logic around it.

The spec's transitions are written out again here, independently of `stenograph.turns`, and every event
sequence the detector or the session produces is checked against them. Where the models are not what is
under test (the property tests), fakes stand in for Silero, Smart Turn and Whisper, and the test names say so.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stenograph.app import create_app
from stenograph.asr import Transcription, Word
from stenograph.config import Settings
from stenograph.errors import ApiError
from stenograph.scheduler import JobSkipped, Priority
from stenograph.turn_routes import early_scoring
from stenograph.turns import (
    BOTH_COMPLETE,
    CONFIDENT_SENTENCE_END,
    FRAME_MS,
    GOING_ON,
    PAUSE_FRAMES,
    RELOOK_FRAMES,
    SENTENCE_END_PROBABILITY,
    UNFINISHED_WEIGHT,
    WORDS_COMPLETE,
    CheckTurn,
    Heard,
    IllegalTransition,
    TurnConfig,
    TurnDetector,
    TurnParams,
    TurnSession,
    TurnState,
    TurnStateMachine,
    ends_sentence,
    extend_sent,
)
from stenograph.vad import FRAME

# Spec 3.4, verbatim: Idle -turn.start-> Speaking; Speaking -turn.eager_end-> EagerEnded;
# Speaking -turn.end-> Idle; EagerEnded -turn.resume-> Speaking; EagerEnded -turn.end-> Idle.
SPEC = {
    ("idle", "turn.start"): "speaking",
    ("speaking", "turn.eager_end"): "eager_ended",
    ("speaking", "turn.end"): "idle",
    ("eager_ended", "turn.resume"): "speaking",
    ("eager_ended", "turn.end"): "idle",
}
EVENTS = ("turn.start", "turn.eager_end", "turn.resume", "turn.end")


def check_spec_order(events: list[str]) -> str:
    """Walk `events` through the spec's table; fail on the first illegal one. Returns the final state."""
    state = "idle"
    for i, event in enumerate(events):
        nxt = SPEC.get((state, event))
        assert nxt is not None, f"event {i} {event!r} in state {state!r}: {events}"
        state = nxt
    return state


# -- the state machine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["idle", "speaking", "eager_ended"])
@pytest.mark.parametrize("event", EVENTS)
def test_state_machine_allows_exactly_the_spec_transitions(state: str, event: str) -> None:
    machine = TurnStateMachine(TurnState(state))
    expected = SPEC.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition):
            machine.apply(event)
        assert machine.state is TurnState(state), "a refused event leaves the state alone"
    else:
        assert machine.apply(event) is TurnState(expected)


def test_state_machine_refuses_unknown_events() -> None:
    with pytest.raises(IllegalTransition):
        TurnStateMachine().apply("turn.update")


# -- parameters -------------------------------------------------------------------------------------------


def test_turn_params_ranges_and_order() -> None:
    assert TurnParams().checked() == TurnParams(0.8, 0.4, 0.2, 5600.0)
    for bad in (
        TurnParams(start_threshold=0.95),
        TurnParams(eager_end_threshold=0.25),
        TurnParams(end_threshold=0.6),
        TurnParams(end_timeout_ms=500),
        TurnParams(end_timeout_ms=12000),
        TurnParams(start_threshold=0.5, eager_end_threshold=0.5, end_threshold=0.2),  # not strictly ordered
        TurnParams(eager_end_threshold=0.3, end_threshold=0.3),
    ):
        with pytest.raises(ApiError) as err:
            bad.checked()
        assert err.value.status == 400


# -- the detector, driven directly ------------------------------------------------------------------------


def run_detector(
    det: TurnDetector, probs: list[float], scores: dict[int, float], relooks: dict[int, float] | None = None
) -> list[str]:
    """Feed frames; answer each score request from `scores` (keyed by pause id), as the session does, and
    each relook from `relooks` (Whisper's new sentence-end probability; none: it heard the same)."""
    events: list[str] = []
    for p in probs:
        pending = list(det.frame(p))
        while pending:
            action = pending.pop(0)
            if isinstance(action, CheckTurn) and not action.score:
                if relooks and action.pause in relooks:
                    pending += det.sentence_end(action.pause, relooks[action.pause])
            elif isinstance(action, CheckTurn):
                sentence_end = SENTENCE_END_PROBABILITY if action.words else None
                pending += det.turn_probability(action.pause, scores.get(action.pause, 0.0), sentence_end)
            else:
                events.append(action)
    return events


def frames(ms: float, prob: float) -> list[float]:
    return [prob] * round(ms / FRAME_MS)


def test_detector_confident_end_after_the_hold_and_unsure_end_waits() -> None:
    det = TurnDetector(TurnParams())
    events = run_detector(det, frames(1000, 0.95) + frames(150, 0.02), {1: 0.95})
    assert events == ["turn.start", "turn.eager_end"], "an eager end at once, no end inside the hold"
    assert run_detector(det, frames(64, 0.02), {}) == ["turn.end"]
    det = TurnDetector(TurnParams())
    # p_complete 0.7: activity 0.3 -> eager end at once, end once (1 - s/T) * 0.3 < 0.2, i.e. s > T/3.
    events = run_detector(det, frames(1000, 0.95) + frames(1500, 0.02), {1: 0.7})
    assert events == ["turn.start", "turn.eager_end"]
    events = run_detector(det, frames(500, 0.02), {})
    assert events == ["turn.end"]


def test_detector_discounts_a_confident_score_when_the_words_do_not_end_a_sentence() -> None:
    det = TurnDetector(TurnParams())
    assert run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {}) == ["turn.start"]
    assert det.turn_probability(det.pause, 0.95, sentence_end=0.1) == []
    assert det.activity() == pytest.approx(1 - 0.95 * UNFINISHED_WEIGHT, abs=0.03)
    assert run_detector(det, frames(800, 0.02), {}) == [], "not even an eager end 0.9 s into the pause"
    # A second into the pause the words count no more: prosody alone ends the turn.
    assert run_detector(det, frames(150, 0.02), {}) == ["turn.end"]
    det = TurnDetector(TurnParams())
    run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
    det.turn_probability(det.pause, 0.7, sentence_end=0.1)
    assert "turn.end" not in run_detector(det, frames(1500, 0.02), {}), "unsure and unfinished: open at 1.6 s"
    assert ends_sentence(" I'd like a table.") and ends_sentence(' He said "no!"') and ends_sentence("")
    assert not ends_sentence(" I'd like a table") and not ends_sentence(" and then...")
    assert not ends_sentence(" for two,")


def test_detector_hears_again_a_pause_whose_words_do_not_end_a_sentence() -> None:
    """A decode ending at the pause's first silent frame may stop inside a softly ending last word ("…of the
    broth", no full stop); 320 ms in, the pause is decoded again and the new words are judged anew."""
    det = TurnDetector(TurnParams())
    run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
    assert det.turn_probability(det.pause, 0.9, sentence_end=0.1) == []
    assert [det.frame(0.02) for _ in range(RELOOK_FRAMES - 1 - det.silence)] == [[]] * 6
    assert det.frame(0.02) == [CheckTurn(det.pause, score=False)]
    assert det.sentence_end(det.pause, 0.9) == ["turn.end"], "whole sentence, sure Smart Turn: the end now"
    assert det.sentence_end(det.pause, 0.9) == [], "after the end, nothing"
    # Heard the same, or a sentence end Whisper is not sure of: the turn waits for the rest of the unfinished
    # hold, as without the relook.
    for again in (0.1, CONFIDENT_SENTENCE_END - 0.01):
        det = TurnDetector(TurnParams())
        run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
        det.turn_probability(det.pause, 0.9, sentence_end=0.1)
        assert run_detector(det, frames(800, 0.02), {}, {det.pause: again}) == []
    # Words that already end a sentence are not decoded again.
    det = TurnDetector(TurnParams())
    run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
    det.turn_probability(det.pause, 0.4, sentence_end=SENTENCE_END_PROBABILITY)
    assert not any(det.frame(0.02) for _ in range(RELOOK_FRAMES * 2))


def test_pause_decode_judges_the_sentence_end_by_whisper_probability_not_its_punctuation() -> None:
    words = [("a", 0, 100), ("table", 100, 200)]
    assert Heard(1, 0, 0, words, end_probability=0.3).sentence_end(" a table") == 0.3, "likely, unprinted"
    assert Heard(1, 0, 0, words, end_probability=0.1).sentence_end(" a table.") == 0.1, "printed, unlikely"
    assert SENTENCE_END_PROBABILITY == 0.25
    # Without a probability (beam search, or nothing heard) the printed punctuation says ended, never sure.
    assert Heard(1, 0, 0, words).sentence_end(" a table.") == SENTENCE_END_PROBABILITY
    assert Heard(1, 0, 0, words).sentence_end(" a table") == 0.0
    assert Heard(1, 0, 0, [], end_probability=0.0).sentence_end("") == SENTENCE_END_PROBABILITY, "a cough"


def test_detector_lets_a_sure_sentence_end_speak_for_an_unsure_smart_turn() -> None:
    def after_pause(p_complete: float, sentence_end: float) -> list[str]:
        det = TurnDetector(TurnParams())
        run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
        return det.turn_probability(det.pause, p_complete, sentence_end) + run_detector(
            det, frames(100, 0.02), {}
        )

    # Smart Turn unsure (0.5): no eager end unless Whisper is sure of the full stop.
    # Then the end follows (1 - 0.75) * (1 - s / 5600) < 0.2, after s = 1120 ms of silence, long before the
    # unsure 0.5 alone would end it (at 3.4 s).
    assert after_pause(0.5, CONFIDENT_SENTENCE_END - 0.01) == []
    assert after_pause(0.5, CONFIDENT_SENTENCE_END) == ["turn.eager_end"]
    assert WORDS_COMPLETE == 0.75
    det = TurnDetector(TurnParams())
    run_detector(det, frames(1000, 0.95) + frames(100, 0.02), {})
    det.turn_probability(det.pause, 0.5, CONFIDENT_SENTENCE_END)
    assert run_detector(det, frames(950, 0.02), {}) == []
    assert run_detector(det, frames(100, 0.02), {}) == ["turn.end"]
    # Smart Turn leaning to "complete" (above 0.5) and Whisper sure: the end at once.
    assert after_pause(0.51, CONFIDENT_SENTENCE_END) == ["turn.eager_end", "turn.end"]
    assert after_pause(0.51, CONFIDENT_SENTENCE_END - 0.01) == []
    assert WORDS_COMPLETE < 1 - TurnParams().end_threshold < BOTH_COMPLETE
    # Smart Turn sure the speaker goes on: the words do not overrule it.
    assert after_pause(GOING_ON, 0.99) == []
    # Sure on both counts: unchanged.
    assert after_pause(0.95, 0.99) == ["turn.eager_end", "turn.end"]


def test_detector_timeout_ends_a_turn_whatever_the_model_says() -> None:
    params = TurnParams(end_timeout_ms=640)
    det = TurnDetector(params)
    events = run_detector(det, frames(1000, 0.95) + frames(640, 0.02), {1: 0.0})
    assert events[-1] == "turn.end"
    det = TurnDetector(TurnParams())
    events = run_detector(det, frames(1000, 0.95) + frames(3000, 0.02), {1: 0.0})
    assert events == ["turn.start"], "a 'not complete' turn is still open after 3 s of a 5.6 s timeout"


def test_detector_resume_after_eager_end_then_end() -> None:
    det = TurnDetector(TurnParams())
    probs = frames(800, 0.95) + frames(300, 0.02) + frames(600, 0.95) + frames(300, 0.02)
    events = run_detector(det, probs, {1: 0.7, 2: 0.9})
    assert events == ["turn.start", "turn.eager_end", "turn.resume", "turn.eager_end", "turn.end"]


def test_detector_early_score_ends_eagerly_at_the_first_silent_frame_and_ends_on_the_rescore() -> None:
    """With `early_score` a pause is scored at its first silent frame, for `turn.eager_end`, and again two
    frames later, with the same words; the end follows the second score."""
    det = TurnDetector(TurnParams(), early_score=True)
    assert run_detector(det, frames(1000, 0.95), {}) == ["turn.start"]
    assert det.frame(0.02) == [CheckTurn(det.pause)]
    assert det.turn_probability(det.pause, 0.95) == ["turn.eager_end"], "no end inside the hold"
    assert det.frame(0.02) == []
    assert det.frame(0.02) == [CheckTurn(det.pause, words=False)]
    assert det.turn_probability(det.pause, 0.5, sentence_end=None) == []
    assert run_detector(det, frames(1000, 0.02), {}) == [], "the unsure second score holds the end back"
    det = TurnDetector(TurnParams(), early_score=True)
    run_detector(det, frames(1000, 0.95) + frames(32, 0.02), {})
    det.turn_probability(det.pause, 0.1, sentence_end=0.1)
    assert run_detector(det, frames(64, 0.02), {det.pause: 0.95}) == [], "unfinished words still halve it"
    assert run_detector(det, frames(1000, 0.02), {}) == ["turn.end"], "a second in, prosody alone"
    # Without it, nothing is asked before the third silent frame.
    det = TurnDetector(TurnParams())
    run_detector(det, frames(1000, 0.95), {})
    assert [det.frame(0.02) for _ in range(PAUSE_FRAMES)] == [[], [], [CheckTurn(det.pause)]]


def test_detector_ignores_clicks_and_stale_scores() -> None:
    det = TurnDetector(TurnParams())
    assert run_detector(det, [0.02, 0.99, 0.02, 0.99, 0.99, 0.02], {}) == []  # never 3 frames in a row
    run_detector(det, frames(500, 0.95) + frames(150, 0.02), {1: 0.0})
    assert det.turn_probability(det.pause - 1, 1.0) == [], "a score for an earlier pause changes nothing"


@dataclass(frozen=True)
class Frame:
    prob: float


@dataclass(frozen=True)
class Score:
    pause_delta: int  # 0: the current pause; < 0: an earlier one (stale)
    p: float
    sentence_end: float  # Whisper's probability of a full stop after the words so far


@dataclass(frozen=True)
class Configure:
    params: TurnParams


@dataclass(frozen=True)
class Finish:
    pass


valid_params = st.builds(
    TurnParams,
    start_threshold=st.floats(0.5, 0.9),
    eager_end_threshold=st.floats(0.3, 0.6),
    end_threshold=st.floats(0.05, 0.5),
    end_timeout_ms=st.floats(640, 11200),
).filter(lambda p: p.start_threshold > p.eager_end_threshold > p.end_threshold)

probability = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.02, 0.49, 0.5, 0.8, 0.95, 1.0]))
ops = st.lists(
    st.one_of(
        st.builds(Frame, probability),
        st.builds(Frame, probability),  # frames are the common input
        st.builds(Score, st.integers(-2, 0), st.floats(0, 1), probability),
        st.builds(Configure, valid_params),
        st.just(Finish()),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(params=valid_params, script=ops, early_score=st.booleans())
def test_detector_never_leaves_spec_order_with_fake_model_scores(
    params: TurnParams, script: list, early_score: bool
) -> None:
    det = TurnDetector(params, early_score)
    events: list[str] = []
    silent_in_turn = 0
    for op in script:
        if isinstance(op, Frame):
            actions = det.frame(op.prob)
        elif isinstance(op, Score):
            actions = det.turn_probability(det.pause + op.pause_delta, op.p, op.sentence_end)
        elif isinstance(op, Configure):
            actions = det.configure(op.params)
        else:
            actions = det.finish()
        for action in actions:
            if isinstance(action, CheckTurn):
                assert det.state is not TurnState.IDLE and action.pause == det.pause
            else:
                events.append(action)
        state = check_spec_order(events)
        assert state == det.state.value
        # The timeout bounds every turn: this many silent frames inside a turn cannot pass without an end.
        if isinstance(op, Frame) and det.state is not TurnState.IDLE and op.prob < 0.5:
            silent_in_turn += 1
        elif isinstance(op, Frame) or det.state is TurnState.IDLE:
            silent_in_turn = 0
        limit = det.params.end_timeout_ms / FRAME_MS + PAUSE_FRAMES + 1
        assert silent_in_turn <= limit, "a turn outlived end_timeout_ms of silence"


# -- the session, with fake models ------------------------------------------------------------------------


class FakeVadStream:
    """Speech probability of a frame = its first sample (the fake audio carries its own VAD verdict)."""

    pending_samples = 0

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._buf, samples])
        n = buf.size // FRAME
        self._buf = buf[n * FRAME :]
        return buf[: n * FRAME : FRAME].astype(np.float32)


class FakeSmartTurn:
    """p_complete = the second sample of the last frame, so the script decides the model's verdicts."""

    def probability(self, audio: np.ndarray) -> float:
        return float(audio[-FRAME + 1]) if audio.size >= FRAME else 0.0


class FakeRecognizer:
    """Hears one word per 8 frames, named after the frames' absolute position (which the fake audio carries),
    timed where those frames sit in the window; the newest word flickers in spelling. A transcript that
    repeats, skips or reorders audio is therefore visible in the word names."""

    def decode_utterance(
        self, audio, language, beam_size, offset=0.0, hotwords=None, prompt=None, prefix=None, **_
    ):
        groups: dict[int, list[int]] = {}
        for pos in np.flatnonzero(audio <= -0.5):
            groups.setdefault(frame_index(audio[pos]) // WORD_FRAMES, []).append(int(pos) - ID_SAMPLE)
        words = [
            Word(f"w{g}", max(0, min(p)) / 16000, min(audio.size, max(p) + FRAME) / 16000)
            for g, p in sorted(groups.items())
        ]
        if words and audio.size % 3 == 0:
            words[-1] = Word(words[-1].word + "?", words[-1].start, words[-1].end)
        return Transcription("".join(" " + w.word for w in words), words)


class FakeScheduler:
    async def run(self, fn, priority, stale=None):
        await asyncio.sleep(0)  # let other coroutines interleave, as a real worker thread would
        if stale is not None and stale():
            raise JobSkipped
        return fn()

    def depth_at_or_above(self, priority) -> int:
        return 0


class RecordingScheduler(FakeScheduler):
    """Notes, for every job a worker starts, its priority and how many silent frames the session had seen."""

    def __init__(self) -> None:
        self.session: TurnSession | None = None
        self.started: list[tuple[Priority, int]] = []

    async def run(self, fn, priority, stale=None):
        def noted():
            assert self.session is not None
            self.started.append((priority, self.session.detector.silence))
            return fn()

        return await super().run(noted, priority, stale)


def fake_engine(scheduler: FakeScheduler | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        vad=SimpleNamespace(stream=FakeVadStream),
        smart_turn=FakeSmartTurn(),
        scheduler=scheduler or FakeScheduler(),
        settings=SimpleNamespace(workers=2),
    )


ID_SAMPLE = 2  # this sample of every fake frame holds -(0.5 + index / 2**20): exact in float32, in range
ID_STEP = 2.0**-20
WORD_FRAMES = 8


def frame_index(value: float) -> int:
    return round((-float(value) - 0.5) / ID_STEP)


def fake_audio(script: list[tuple[float, float, int]]) -> np.ndarray:
    """(vad prob, p_complete, frames) runs -> float samples that carry both numbers and the frame's index in
    every frame."""
    out = []
    for prob, p_complete, count in script:
        frames = np.full((count, FRAME), 0.001, dtype=np.float32)
        frames[:, 0], frames[:, 1] = prob, p_complete
        out.append(frames)
    if not out:
        return np.zeros(0, dtype=np.float32)
    frames = np.concatenate(out)
    frames[:, ID_SAMPLE] = -(0.5 + np.arange(len(frames)) * ID_STEP)
    return frames.reshape(-1)


def encode_float(samples: np.ndarray) -> bytes:
    return samples.astype("<f4").tobytes()


async def run_session(
    audio: np.ndarray,
    chunk: int,
    configs: list[dict[str, float]],
    scheduler: FakeScheduler | None = None,
    recognizer: FakeRecognizer | None = None,
    early_score: bool = False,
) -> list[tuple[str, str | None]]:
    params = TurnParams(end_timeout_ms=1000)
    config = TurnConfig("ink-2", "pcm_f32le", 16000, params, update_interval=0.3, early_score=early_score)
    recognizer = recognizer or FakeRecognizer()
    session = TurnSession(fake_engine(scheduler), recognizer, config)  # type: ignore[arg-type]
    if isinstance(scheduler, RecordingScheduler):
        scheduler.session = session
    events: list[tuple[str, str | None]] = []

    async def drain() -> None:
        while True:
            out = await (await session.outputs.get())
            if out == "END":
                return
            if out is not None:
                events.append((out.kind, out.transcript))

    async def end_marker() -> str:
        return "END"

    sender = asyncio.ensure_future(drain())
    data = encode_float(audio)
    step = chunk * 4
    for i, start in enumerate(range(0, len(data), step)):
        await session.feed(data[start : start + step])
        for _ in range(4):  # the sender keeps up, as it does with audio in real time
            await asyncio.sleep(0)
        if configs and i % 7 == 3:
            session.configure(configs[i % len(configs)])
    await session.finish()
    session.outputs.put_nowait(end_marker())
    await sender
    return events


runs = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.1, 0.6, 0.85, 0.99]),  # VAD probability
        st.sampled_from([0.0, 0.3, 0.7, 0.9]),  # Smart Turn's p_complete if a pause is scored there
        st.integers(1, 160),  # frames
    ),
    max_size=16,
)
config_changes = st.lists(
    st.fixed_dictionaries(
        {"end_timeout_ms": st.sampled_from([640.0, 2000.0]), "end_threshold": st.sampled_from([0.1, 0.3])}
    ),
    max_size=2,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=runs,
    chunk=st.sampled_from([160, 512, 1600, 7000]),
    configs=config_changes,
    early_score=st.booleans(),
)
def test_session_with_fake_models_keeps_spec_order_and_never_revises_text(
    script: list[tuple[float, float, int]], chunk: int, configs: list[dict[str, float]], early_score: bool
) -> None:
    events = asyncio.run(run_session(fake_audio(script), chunk, configs, early_score=early_score))
    kinds = [k for k, _ in events if k != "turn.update"]
    assert check_spec_order(kinds) == "idle", "close ends an open turn"
    turn_text: str | None = None
    session_text = ""
    for kind, text in events:
        if kind == "turn.start":
            assert turn_text is None
            turn_text = ""
            continue
        assert turn_text is not None, f"{kind} outside a turn: {events}"
        if kind == "turn.resume":
            continue
        assert text is not None and text.startswith(turn_text), f"revised: {turn_text!r} -> {text!r}"
        if kind == "turn.update":
            assert len(text) > len(turn_text), "turn.update only when the transcript grew"
        turn_text = text
        if kind == "turn.end":
            if session_text and text:
                assert text.startswith(" "), "later turns carry their leading space"
            session_text += text
            turn_text = None
    check_fake_words(events)


def check_fake_words(events: list[tuple[str, str | None]]) -> None:
    """Each turn's words follow the audio once each, in order, with no gap; turns never go back in time."""
    last = -1
    for kind, text in events:
        if kind != "turn.end" or not text:
            continue
        ids = [int(w.rstrip("?")[1:]) for w in text.split()]
        assert ids == list(range(ids[0], ids[0] + len(ids))), (
            f"words repeated, skipped or reordered: {text!r}"
        )
        assert ids[0] >= last, f"a turn went back in time: {text!r}"
        last = ids[-1]


@pytest.mark.parametrize("early_score", [False, True])
def test_session_with_fake_models_same_turns_whatever_the_chunking(early_score: bool) -> None:
    script = [
        (0.0, 0.0, 20),
        (0.99, 0.0, 160),  # 5 s of speech: updates send words before the pause decode
        (0.0, 0.95, 30),
        (0.99, 0.0, 100),
        (0.0, 0.7, 80),
        (0.99, 0, 30),
    ]
    audio = fake_audio(script)
    results = {
        chunk: asyncio.run(run_session(audio, chunk, [], early_score=early_score))
        for chunk in (160, 1600, 16000)
    }
    kinds = {chunk: [k for k, _ in ev if k != "turn.update"] for chunk, ev in results.items()}
    for events in results.values():
        check_fake_words(events)
        assert sum(len((text or "").split()) for kind, text in events if kind == "turn.end") > 20
    assert kinds[160] == [
        *("turn.start", "turn.eager_end", "turn.end"),  # p 0.95: eager at once, the end after the hold
        *("turn.start", "turn.eager_end", "turn.end"),  # p 0.7: eager at once, the end ~1/3 into the timeout
        *("turn.start", "turn.end"),  # close ends the open turn
    ]
    assert kinds[160] == kinds[1600] == kinds[16000], "decisions follow the audio, not how it was chunked"


def test_session_with_fake_models_starts_no_update_while_the_speaker_is_silent() -> None:
    """A silent frame may begin a pause, whose decode is what `turn.end` waits for: an update decode begun
    then would share the CPU with it. Speech with one- and two-frame dips (never a pause) puts update times
    on silent frames; updates still run, but only while the speaker is heard."""
    script = [(0.0, 0.0, 10)]
    for n in range(7, 17):
        script += [(0.99, 0.0, n), (0.0, 0.0, 1 + n % 2)]
    script += [(0.99, 0.0, 10), (0.0, 0.95, 40)]
    for chunk in (160, 512, 1600):
        scheduler = RecordingScheduler()
        events = asyncio.run(run_session(fake_audio(script), chunk, [], scheduler))
        updates = [silence for priority, silence in scheduler.started if priority is Priority.INTERIM]
        assert len(updates) >= 5, f"updates still run during speech: {scheduler.started}"
        assert set(updates) == {0}, f"an update started while the speaker was silent: {scheduler.started}"
        assert [k for k, _ in events if k != "turn.update"] == ["turn.start", "turn.eager_end", "turn.end"]
        check_fake_words(events)


class UnfinishedRecognizer(FakeRecognizer):
    """The fake words, never ending a sentence; notes the frames (first, last) each pause decode hears."""

    def __init__(self) -> None:
        self.pause_windows: list[tuple[int, int]] = []

    def decode_utterance(self, audio, *args, **kwargs):
        if kwargs.get("end_probability"):
            ids = [frame_index(v) for v in audio if v <= -0.5]
            self.pause_windows.append((min(ids), max(ids)))
        result = super().decode_utterance(audio, *args, **kwargs)
        words = [Word(w.word.rstrip("?"), w.start, w.end) for w in result.words]
        return Transcription("".join(" " + w.word for w in words), words)


def test_session_decodes_an_unfinished_pause_again_whole_with_fake_models() -> None:
    """Words without a sentence end at a pause's first silent frame: RELOOK_FRAMES into the pause the whole
    turn is decoded again, up to that frame."""
    recognizer = UnfinishedRecognizer()
    script = [(0.0, 0.0, 20), (0.99, 0.0, 40), (0.0, 0.3, 60)]  # frames 20-59 speech, then silence
    events = asyncio.run(run_session(fake_audio(script), 512, [], recognizer=recognizer))
    assert [k for k, _ in events if k != "turn.update"] == ["turn.start", "turn.eager_end", "turn.end"]
    (_, early_end), relook = recognizer.pause_windows
    assert early_end == 60, "the first pause decode ends with the pause's first silent frame"
    # The turn opens on its third speech frame (22) with 0.5 s of audio before those three: from inside
    # frame 4, so frame 5 is the first whole frame of the turn.
    assert relook == (5, 60 + RELOOK_FRAMES - 1)


def test_extend_sent_keeps_sent_words_verbatim() -> None:
    sent = [("I'd", 0, 10), ("like", 10, 20), ("to", 20, 30)]

    def words(timed: list[tuple[str, int, int]]) -> list[str]:
        return [w for w, _, _ in timed]

    decoded = [("I'd", 0, 10), ("like", 10, 20), ("to,", 20, 30), ("book", 30, 40), ("a", 40, 45)]
    assert extend_sent(sent, 30, decoded) == [*sent, ("book", 30, 40), ("a", 40, 45)]
    # Heard differently: the continuation is what lies after the sent words.
    decoded = [("Id", 0, 10), ("liked", 10, 22), ("two", 22, 30), ("book", 30, 40)]
    assert words(extend_sent(sent, 30, decoded)) == ["I'd", "like", "to", "book"]
    decoded = [("Id", 0, 10), ("liked", 10, 20), ("to", 20, 34), ("book", 34, 40)]
    assert words(extend_sent(sent, 26, decoded)) == ["I'd", "like", "to", "book"], "a cut word heard whole"
    assert extend_sent(sent, 30, []) == sent, "a decode that heard nothing takes nothing back"
    # Heard differently earlier, but with the last sent words where they were said: the continuation
    # follows them, even where the sent word's end (from another decode) reaches into the next word (seen
    # live: "…dominions that the" sent, "…dominion that the sailorman was" heard, "sailorman" lost).
    sent = [("dominions", 0, 10), ("that", 10, 20), ("the", 20, 34)]
    decoded = [("dominion", 0, 10), ("that", 10, 20), ("the", 20, 24), ("sailorman", 24, 40), ("was", 40, 45)]
    assert words(extend_sent(sent, 34, decoded)) == ["dominions", "that", "the", "sailorman", "was"]
    decoded = [("the", 0, 5), ("that", 5, 8), ("the", 8, 9), ("dominion", 9, 12), ("that", 12, 20)]
    decoded += [("the", 20, 30), ("sailor", 30, 33), ("man", 33, 40)]
    assert words(extend_sent(sent, 34, decoded)) == ["dominions", "that", "the", "man"], (
        "two copies of the ending: neither is trusted, the times decide"
    )
    second = 16000
    far = [("that", 0, second), ("the", second, 2 * second), ("dominion", 2 * second, 3 * second)]
    assert extend_sent(sent, 5 * second, far) == sent, "a copy a second or more from the sent one is another"
    sent = [("I'd", 0, 10), ("like", 10, 20), ("to", 20, 30)]
    # A tail decode whose audio starts at sent word 1, with "like to" as its forced prefix.
    tail = [("like", 10, 20), ("to", 20, 30), ("book", 30, 40)]
    assert extend_sent(sent, 30, tail, first=1) == [*sent, ("book", 30, 40)]
    tail = [("like", 10, 20), ("to", 20, 30), ("like", 30, 35), ("to", 35, 40)]
    assert words(extend_sent(sent, 30, tail, first=1)) == [*words(sent), "like", "to"], (
        "said again: new words"
    )
    # The forced prefix's last word transcribed a second time over its own audio (seen live: "than
    # apprehension. apprehension."): not a new word.
    tail = [("to.", 20, 22), ("to.", 22, 31)]
    assert extend_sent(sent, 30, tail, first=2) == sent
    tail = [("to", 20, 29), ("to", 31, 38)]
    assert extend_sent(sent, 30, tail, first=2) == [*sent, ("to", 31, 38)], "'to to' said twice is kept"
    # Words sent since the decode was made are not taken twice.
    later = [*sent, ("book", 30, 40)]
    assert extend_sent(later, 40, [*tail[:2], ("book", 30, 40), ("a", 40, 45)], first=1) == [
        *later,
        ("a", 40, 45),
    ]


class SentenceRecognizer(FakeRecognizer):
    """The fake words, always ending a sentence; counts the pause decodes."""

    def __init__(self) -> None:
        self.pause_decodes = 0

    def decode_utterance(self, audio, *args, **kwargs):
        self.pause_decodes += bool(kwargs.get("end_probability"))
        result = super().decode_utterance(audio, *args, **kwargs)
        words = [Word(w.word.rstrip("?"), w.start, w.end) for w in result.words]
        words[-1:] = [Word(w.word + ".", w.start, w.end) for w in words[-1:]]
        return Transcription("".join(" " + w.word for w in words), words)


@pytest.mark.parametrize("early_score", [False, True])
def test_session_early_score_scores_a_pause_twice_and_decodes_it_once_with_fake_models(
    early_score: bool,
) -> None:
    """Smart Turn hears "complete" at the pause's first silent frame and "going on" from the third: scored
    early, the turn ends eagerly at once and ends only on the timeout; scored once, at the third frame, it
    has no eager end. Either way the pause is decoded once."""
    recognizer = SentenceRecognizer()
    script = [(0.0, 0.0, 20), (0.99, 0.0, 40), (0.0, 0.95, 2), (0.0, 0.1, 60)]
    events = asyncio.run(
        run_session(fake_audio(script), 512, [], recognizer=recognizer, early_score=early_score)
    )
    kinds = [k for k, _ in events if k != "turn.update"]
    assert (
        kinds == ["turn.start", "turn.eager_end", "turn.end"] if early_score else ["turn.start", "turn.end"]
    )
    assert recognizer.pause_decodes == 1
    ends = [text for kind, text in events if kind in ("turn.eager_end", "turn.end")]
    assert len(set(ends)) == 1 and ends[0].endswith("."), ends


def test_early_score_setting_is_on_where_decodes_run_on_a_gpu_and_unknown_values_are_refused(
    tmp_path,
) -> None:
    assert [early_scoring("auto", device) for device in ("cpu", "cuda")] == [False, True]
    assert early_scoring("on", "cpu") and not early_scoring("off", "cuda")
    with pytest.raises(ValueError, match="STENOGRAPH_TURN_EARLY_SCORE must be on, off or auto"):
        create_app(Settings(turn_early_score="sometimes", state_dir=tmp_path), preload=False)


@pytest.mark.parametrize("early_score", [False, True])
def test_session_end_after_an_eager_end_carries_its_text_with_fake_models(early_score: bool) -> None:
    """A sound too short to resume the turn (two frames of speech below the start threshold) after
    `turn.eager_end`: the fake model hears words in it, but `turn.end` carries the eager end's text."""
    script = [(0.0, 0.0, 20), (0.99, 0.0, 40), (0.0, 0.7, 5), (0.6, 0.7, 2), (0.0, 0.7, 60)]
    recognizer = SentenceRecognizer()
    events = asyncio.run(
        run_session(fake_audio(script), 512, [], recognizer=recognizer, early_score=early_score)
    )
    ends = [(k, text) for k, text in events if k != "turn.update"]
    assert [k for k, _ in ends] == ["turn.start", "turn.eager_end", "turn.end"], events
    (_, eager), (_, end) = ends[1:]
    assert end == eager and eager.endswith("."), events
    assert recognizer.pause_decodes >= 2, "the sound began a new pause, decoded and scored like any other"
